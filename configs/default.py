"""Defaults shared by every experiment config.

Experiment configs start from `get_config()` here and change what their experiment
needs. Every key can be overridden on the command line, e.g.

    python launch.py --config=configs/quickstart.py --config.num_epochs=3
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- Data -------------------------------------------------------------------
    # 'digits' | 'idx:DIR' | 'folder:DIR' | any TFDS name ('cifar10', 'mnist', ...).
    c.dataset = 'digits'
    c.data_dir = config_dict.placeholder(str)  # TFDS data_dir.
    c.manual_dir = config_dict.placeholder(str)  # TFDS manual_dir.
    c.cache_dir = config_dict.placeholder(str)  # Decoded-array cache; default ~/.cache/cnn_jax.
    c.val_fraction = 0.1  # Carved deterministically from train.
    c.data_seed = 0  # Seeds the validation split only.
    # Keep only these classes (names or indices), relabelled 0..k-1 in this order.
    c.classes = config_dict.placeholder(tuple)
    # Merge labels: one tuple of old labels per new class, e.g. ((0, 6), (1, 7), ...).
    c.label_groups = config_dict.placeholder(tuple)
    c.label_group_names = config_dict.placeholder(tuple)
    c.one_vs_rest = config_dict.placeholder(str)  # Class name (or index) against the rest.
    c.image_size = config_dict.placeholder(int)  # Square resize on the device.
    c.normalize = 'dataset'  # 'dataset' (train mean/std) | 'imagenet' | 'none'.
    c.max_train_examples = config_dict.placeholder(int)  # Subsample train (quick runs).
    # Subsample val and test, and cap the final train-split evaluation (quick runs).
    c.max_eval_examples = config_dict.placeholder(int)
    # 'device': every split on every device; 'stream': each process decodes its share of
    # each batch on the host (folder: and TFDS); 'auto': stream what exceeds the budget.
    c.input_mode = 'auto'
    c.device_memory_budget_gb = 0.0  # Per device for 'auto'; 0: half the device's memory.

    # On-device augmentation of training batches.
    c.augment = ml_collections.ConfigDict()
    c.augment.flip = False  # Random horizontal flip.
    c.augment.crop_padding = 0  # Random crop after zero padding by this many pixels.
    c.augment.rotation_degrees = 0.0  # Random rotation in [-d, d].
    c.augment.scale = 0.0  # Random zoom in [1 - s, 1 + s].
    # Mixup and CutMix (timm --mixup, --cutmix, --mixup-prob, --mixup-switch-prob), last,
    # with the batch reversed as partner; targets become soft. Alphas 0: off.
    c.augment.mixup_alpha = 0.0  # lam ~ Beta(alpha, alpha).
    c.augment.cutmix_alpha = 0.0
    c.augment.mix_prob = 1.0  # Chance that a batch is mixed.
    c.augment.switch_prob = 0.5  # With both alphas > 0: chance of CutMix over mixup.

    # --- Model ------------------------------------------------------------------
    c.model = 'small_cnn'  # See cnn_jax.models.MODELS.
    c.model_options = ml_collections.ConfigDict()  # Keyword arguments of the model.
    c.dtype = 'float32'  # Compute dtype: 'float32' | 'bfloat16' (parameters stay fp32).
    # 'module': each layer's own initialiser (Flax's default; torchvision's in VGG/ResNet).
    # 'torch': conv and dense layers as PyTorch's defaults draw them, as the reports' were.
    c.init = 'module'

    # --- Optimisation -----------------------------------------------------------
    c.num_epochs = 10
    c.batch_size = 128  # Global batch, split over all devices.
    c.eval_batch_size = 512
    c.optimizer = 'sgd'  # 'sgd' | 'momentum' | 'nesterov' | 'adam' | 'adamw'.
    c.learning_rate = 0.1
    c.momentum = 0.9  # For 'momentum' and 'nesterov'.
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0
    c.weight_decay_mode = 'coupled'  # 'coupled' (L2 in the gradient) | 'decoupled'.
    c.schedule = 'constant'  # 'constant' | 'step' | 'cosine' | 'warmup_cosine'.
    c.warmup_epochs = 0.0
    c.step_epochs = ()  # 'step' schedule: epochs at which lr is multiplied by step_factor.
    c.step_factor = 0.1
    c.grad_clip_norm = config_dict.placeholder(float)
    # Gradient accumulation (timm --grad-accum-steps): each optimiser step sees
    # batch_size x grad_accum_steps examples, run as grad_accum_steps micro-batches of
    # batch_size inside the compiled step; schedules and steps_per_epoch count optimiser
    # steps. 1: off. See cnn_jax.accumulate.
    c.grad_accum_steps = 1
    # Moving average of the weights and BatchNorm statistics (timm --model-ema
    # --model-ema-decay), used for evaluation, the best checkpoint and the report. 0: off.
    c.ema_decay = 0.0
    # Decay min(ema_decay, (1 + n) / (10 + n)) after optimiser step n (cnn_jax.ema).
    c.ema_warmup = False
    # Fine-tuning: top-level parameter names (or prefixes) to freeze; ('backbone',) = all
    # but the head. backbone_lr_factor scales the learning rate of non-head parameters.
    c.freeze = ()
    c.head_name = 'fc'
    c.backbone_lr_factor = 1.0
    c.loss = 'cross_entropy'  # 'cross_entropy' | 'mse' | 'l1'.
    c.label_smoothing = 0.0

    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.monitor = 'val_loss'  # 'val_loss' | 'val_accuracy'.
    c.early_stopping.patience = 0  # Evaluations without improvement; 0 disables.
    c.early_stopping.min_delta = 0.0

    # --- Records ----------------------------------------------------------------
    c.seed = 0
    c.log_every_steps = 50
    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 2  # Latest N are kept, and the best by best_metric.
    c.best_metric = 'val_accuracy'
    c.steps_per_epoch = config_dict.placeholder(int)  # Cap (quick runs, tests).
    c.eval_test_each_epoch = False  # Also evaluate the test split after every evaluation.
    # Validation evaluations per epoch, evenly spaced, the last at the epoch's end (Lightning's
    # val_check_interval = 1/N): each makes a row of metrics.jsonl and an early-stopping check.
    c.evals_per_epoch = 1
    # Trace this many train steps after the first (compiled) one with jax.profiler into
    # <workdir>/tensorboard (TensorBoard's profile plugin opens it). 0: off.
    c.profile_steps = 0
    # The first batch's loss further than this (relative) from ln(classes) warns.
    c.sanity_loss_tolerance = 0.5
    c.task = 'train'  # 'train' | 'svm' (frozen features + linear SVM).
    c.name = ''  # Title of the run's reports ('' = the model); a study's runs '<study>:<variant>'.
    c.svm = ml_collections.ConfigDict()  # task 'svm': the LinearSVC on the frozen features.
    c.svm.C = 1.0
    c.svm.class_weight = config_dict.placeholder(str)  # None | 'balanced'.
    c.svm.max_iter = 5000
    c.pretrained = config_dict.placeholder(str)  # torchvision weights file.
    # Studies: train variants that differ only in cnn_jax.sweep.SWEEPABLE keys as one
    # vmapped program. 'auto' (on accelerators only), 'true' or 'false'.
    c.vectorize = 'auto'
    return c
