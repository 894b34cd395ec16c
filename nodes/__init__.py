"""Thin ComfyUI adapters over diffpriv_core."""
from .faces import FaceCrop, FaceDetect, FacePaste
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
    FaceRecognizerLoader,
    IdentityGuidanceNode,
    IdentitySimilarity,
    PadToVAESize,
    CropToOriginalSize,
    WrongKeyExperiment,
]
