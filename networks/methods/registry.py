"""The registry of detection methods: ``--model`` names → :class:`networks.methods.detector.Detector` classes.

A new method is a new file with a ``@register_detector`` class, plus its import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Imported for their registration (each module's class decorator fills DETECTORS).
from networks.features import PRESETS, ExtractorConfig
import networks.methods.btf  # noqa: F401
import networks.methods.cfm  # noqa: F401
import networks.methods.cmdr  # noqa: F401
from networks.methods.detector import DETECTORS, Detector
import networks.methods.m3dm  # noqa: F401
import networks.methods.mafr  # noqa: F401
import networks.methods.patchcore  # noqa: F401
import networks.methods.shape_guided  # noqa: F401

DEFAULT_MODEL = "cmdr"


def detector_names() -> list[str]:
    """The registered ``--model`` names, the flagship first."""
    return [DEFAULT_MODEL, *sorted(name for name in DETECTORS if name != DEFAULT_MODEL)]


def detector_class(name: str) -> type[Detector]:
    if name not in DETECTORS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(detector_names())}")
    return DETECTORS[name]


def parse_model_options(name: str, pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["smoothness=all"]`` → ``{"smoothness": "all"}``, checked against the method's ``option_choices``
    (typed options converted: ``coreset=0.1`` → ``{"coreset": 0.1}``)."""
    choices = detector_class(name).option_choices
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or key not in choices:
            known = ", ".join(f"{k}={_allowed(v)}" for k, v in choices.items()) or "none"
            raise ValueError(f"--model_option {pair!r}: {name} has the options {known}")
        allowed = choices[key]
        if isinstance(allowed, type):
            try:
                options[key] = allowed(value)
            except ValueError:
                raise ValueError(f"--model_option {key}: expected a{'n' if allowed is int else ''} "
                                 f"{allowed.__name__}, got {value!r}") from None
        elif value not in allowed:
            raise ValueError(f"--model_option {key}: choose from {_allowed(allowed)}, got {value!r}")
        else:
            options[key] = value
    return options


def _allowed(choice: tuple[str, ...] | type) -> str:
    return f"<{choice.__name__}>" if isinstance(choice, type) else "|".join(choice)


def extractor_config(preset: str, model: str = DEFAULT_MODEL) -> ExtractorConfig:
    """The feature extractors of ``--preset`` for ``--model``: the method's own (BTF's ``paper``) or the shared
    :data:`networks.features.PRESETS`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return detector_class(model).presets.get(preset, PRESETS[preset])


def build_detector(name: str, config: ExtractorConfig, modality: str = "rgbxyz", **options: Any) -> Detector:
    """The method ``name`` sized for ``config`` (modules built in a fixed order: reproducible for a seed)."""
    return detector_class(name)(config, modality, **options)
