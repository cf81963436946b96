"""Models: the hybrid CNN + Transformer, transfer-learning baselines, ensemble, checkpoints.

Importing the package registers ``ct_resnet152`` (the CT-pretrained backbone) with timm.
"""

from kidneyscan.models import ct_resnet as _ct_resnet  # noqa: F401  (timm registration)
