"""ConvNeXt as a backbone: torchvision's detectors (Mask/Faster R-CNN, RetinaNet, FCOS) and UperNet."""

from .backbone import ConvNeXtBackbone, ConvNeXtFPN, official_state_dict
from .detection import ARCHS, create_detector, head_defaults
from .segmentation import HEADS, Segmenter, create_segmenter

__all__ = ["ARCHS", "HEADS", "ConvNeXtBackbone", "ConvNeXtFPN", "Segmenter", "create_detector", "create_segmenter",
           "head_defaults", "official_state_dict"]
