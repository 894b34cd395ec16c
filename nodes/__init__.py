"""Thin ComfyUI adapters over diffpriv_core."""
import functools

from diffpriv_core.dependencies import missing_dependency

from .faces import FaceBatch, FaceCrop, FaceDetect, FacePaste, PhotoFaces
from .frame import CropToOriginalSize, PadToVAESize
from .guidance import FaceRecognizerLoader, IdentityGuidanceNode
from .keyfiles import LoadPrivacyKey, SavePrivacyKey
from .msi import MSIInversion
from .protect import GuidedDDIMSampler, GuidedDDIMSamplerSelect
from .recovery import DDIMInversionKey, Recover, WrongKeyExperiment
from .scheduler import EmbeddingScheduler
from .similarity import IdentitySimilarity

NODES = [
    MSIInversion,
    EmbeddingScheduler,
    GuidedDDIMSampler,
    GuidedDDIMSamplerSelect,
    DDIMInversionKey,
    Recover,
    SavePrivacyKey,
    LoadPrivacyKey,
    FaceDetect,
    FaceCrop,
    FacePaste,
    FaceBatch,
    PhotoFaces,
    FaceRecognizerLoader,
    IdentityGuidanceNode,
    IdentitySimilarity,
    PadToVAESize,
    CropToOriginalSize,
    WrongKeyExperiment,
]


def explain_missing_dependencies(node):
    """A package the node imports when it runs, missing from ComfyUI's Python, fails the
    prompt with words that say what to install, not with a bare ModuleNotFoundError."""
    execute = node.execute.__func__

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except ModuleNotFoundError as exc:
            explained = missing_dependency(exc.name or "")
            if explained is None:
                raise
            raise explained from exc

    node.execute = classmethod(checked)
    return node


for _node in NODES:
    explain_missing_dependencies(_node)
