"""dynzoo: dynamic (early-exit, cost-adjustable) image classifiers on timm's registry."""
from . import models
from .factory import UnknownModelError, create_model, is_dynzoo_model, list_models
from .pretrained import PretrainedWeightsNotFoundError
from .flops import count_macs, per_exit_flops, per_exit_macs, per_exit_params
from .models import CheckpointMismatchError, MultiExitNetwork
from .sdpoint import instance_flops, instance_macs
from .hub import CheckpointFileError, push_to_hub, save_pretrained
from .inference import early_exit, evaluate_budgeted, fit_thresholds
from .evaluate import evaluate_anytime
from .policies import ExitPolicy, expected_calibration_error, fit_temperatures, fit_to_budget
from .models import fuse_conv_bn, optimize_for_inference

__version__ = '0.1.0'
