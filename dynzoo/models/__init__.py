"""dynzoo's model families; importing this package registers every model in timm's registry."""
from ._exits import MultiExitNetwork, compact_batch
from ._helpers import CheckpointMismatchError, check_state_dict, unwrap_state_dict
from .msdnet import MSDNet
from .scan import ScanResNet
from .densenet_bc import DenseNet, DenseNetMC
from .resnet_mc import ResNetMC
from .sdpoint import Instance, SDPointResNet
from ._fuse import FoldedBatchNorm, PointwiseConv, folded_batch_norms, fuse_conv_bn, optimize_for_inference
