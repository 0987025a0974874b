"""Sample-quality metrics: toy 2-D (sliced-W2, MMD, checkerboard support/mass) with the reference protocol,
and labelled images (classifier-feature FD, precision/recall, class accuracy; digits, Fashion-MNIST,
MNIST-5k), over-saturation measures of grey images before clipping, and the bits/dim of GM models
(GMFlow Eq. 21)."""

from gmflow.metrics import classifier, classifier_cache, images, likelihood, reference, saturation, toy2d
from gmflow.metrics.classifier import *  # noqa: F403
from gmflow.metrics.classifier_cache import *  # noqa: F403
from gmflow.metrics.images import *  # noqa: F403
from gmflow.metrics.likelihood import *  # noqa: F403
from gmflow.metrics.reference import *  # noqa: F403
from gmflow.metrics.saturation import *  # noqa: F403
from gmflow.metrics.toy2d import *  # noqa: F403

__all__ = [
    *classifier.__all__,
    *classifier_cache.__all__,
    *images.__all__,
    *likelihood.__all__,
    *reference.__all__,
    *saturation.__all__,
    *toy2d.__all__,
]
