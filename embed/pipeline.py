"""The embed stage: every nucleus of every sample -> cached features, resumable and shardable.

`embed_sample` computes only the units that are not done yet for the requested (encoder, patch size) entries, and
only this shard's share of them (`rank`, `world_size`), so independent processes (torchrun ranks, Dask workers,
several machines on a shared file system) fill disjoint chunks of the same cache. Processes without a shard of
their own (two `python -m embed` on one cache) share the units through per-unit lock files: each claims the next free
unit, and waits at the end for the units that the other is still computing, so both finish with a complete cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from embed import handcrafted
from slidedata import locks
from slidedata.errors import DataError
from embed.encoders import PatchEncoder, load_encoder
from embed.patches import (DieWithParent, PatchCut, UnitClaims, UnitFeatures, UnitPatchDataset, UnitPatches,
                           contiguous_share)
from embed.registry import encoder_input_size
from embed.tta import mean_over_views, views
from slidedata.feature_store import FeatureEntry, FeatureStore, identity_attrs
from slidedata.patch_size import DEFAULT_PATCH_SIZES, PatchSize, patch_sizes
from slidedata.progress import progress_bar
from slidedata.publish import check_writable, is_disk_full
from slidedata.recipe import Recipe
from slidedata.sample import Elements, Sample, open_samples
from slidedata.tiles import DEFAULT_MAX_TILE

log = logging.getLogger(__name__)

CODE_VERSION = "embed-2"
WAIT_POLL_S = 1.0  # how often a process re-checks units that another process is computing
MAX_CPU_WORKERS = 4  # each holds a tile and a unit's patches (about 1-1.5 GB on a real slide)
# Nuclei of work a default CPU worker must have to be started: starting and joining one costs about 0.12 CPU-s (the
# handcrafted features of ~90 nuclei); the 3 x 500 nuclei of the test fixture took 33% more CPU with two workers.
MIN_NUCLEI_PER_WORKER = 1000


class CacheDiskFull(DataError):
    """The disk of the feature cache filled up during the embed stage (nothing finished is lost)."""


@dataclass
class EmbedSettings:
    patch_sizes: tuple[PatchSize, ...] = DEFAULT_PATCH_SIZES  # given as 64 / '64' (slide pixels) or '32um' (microns)
    batch_size: int = 256
    chunk_nuclei: int = 1024
    num_workers: int | None = None  # DataLoader workers; None: see `loader_workers`
    torch_threads: int | None = None  # encoder threads on a CPU; None: see `cpu_threads`
    pad_mode: str = "symmetric"
    stain_normalization: str | None = None  # None | 'macenko'
    autocast: bool = True  # bf16 autocast on CUDA
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    max_units: int | None = None  # stop after this many units (tests and benchmarks)
    input_size: int | None = None  # resample every crop to this edge instead of the encoder's own (CPU speed)
    max_tile: int = DEFAULT_MAX_TILE  # cap on the edge of the tiles read at once (memory per worker)
    tta: bool = False  # features averaged over the 8 dihedral views of each crop (embed.tta): 8x the encoder's work

    def __post_init__(self):
        self.patch_sizes = patch_sizes(self.patch_sizes)
        if not self.patch_sizes:
            raise ValueError("patch_sizes: give at least one patch size")
        for name, least, optional in (("batch_size", 1, False), ("chunk_nuclei", 1, False), ("world_size", 1, False),
                                      ("max_tile", 1, False), ("rank", 0, False), ("num_workers", 0, True),
                                      ("torch_threads", 1, True), ("max_units", 1, True), ("input_size", 1, True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                what = "a positive integer" if least else "0 or a positive integer"
                raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be below world_size ({self.world_size}), got {self.rank}")
        if not isinstance(self.tta, (bool, np.bool_)):
            raise ValueError(f"tta must be True or False, got {self.tta!r}")
        self.tta = bool(self.tta)
        if self.stain_normalization not in (None, "macenko"):
            raise ValueError(f"stain_normalization must be None or 'macenko', got {self.stain_normalization!r}")


@dataclass
class EmbedReport:
    sample: str
    nuclei: int
    units_total: int
    units_computed: int
    seconds: float
    entries: list[Path] = field(default_factory=list)
    encoder: str = ""


@dataclass(frozen=True)
class PatchPlan:
    """How one patch size is cut from a sample and shown to an encoder."""

    key: str  # the cache key, e.g. '64' or '32um'
    crop_pixels: int  # edge of the crop on the slide
    input_size: int  # edge the crop is resampled to for the encoder


def patch_plans(sample: Sample, encoder: PatchEncoder, settings: EmbedSettings) -> dict[str, PatchPlan]:
    plans = {}
    for patch_size in settings.patch_sizes:
        crop = patch_size.pixels(sample.microns_per_pixel, sample=str(sample.path))
        size = settings.input_size or encoder_input_size(encoder.spec, crop, sample.microns_per_pixel)
        plans[patch_size.key] = PatchPlan(patch_size.key, crop, size)
    return plans


def entry_attrs(encoder: PatchEncoder, plan: PatchPlan, sample: Sample, n_nuclei: int, settings: EmbedSettings,
                input_digest: str = "") -> dict:
    """What an entry's numbers depend on (its identity), the one place that decides it: the entry records these
    values and their names, and the cache compares what it records (see slidedata.feature_store.identity_attrs).

    Adding a setting = adding it here. The per-sample values differ between the samples of one model; a model
    records the settings only, and refuses features made with other settings.
    """
    spec = encoder.spec
    embedding = {
        "encoder": spec.name, "weights_sha256": encoder.weights_sha256, "patch_size": plan.key,
        "input_size": plan.input_size, "interpolation": spec.interpolation,
        "encoder_microns_per_pixel": spec.microns_per_pixel,
        "mean": list(spec.mean), "std": list(spec.std), "pooling": spec.pooling,
        "stain_normalization": settings.stain_normalization or "none", "use_mask": spec.use_mask,
        "pad_mode": settings.pad_mode, "dim": spec.dim,
        # Only when on: without it the features are what every earlier version made, so their caches stay valid.
        **({"tta": True} if settings.tta else {}),
        "chunk_nuclei": int(settings.chunk_nuclei),
        "code_version": CODE_VERSION, "encoder_code_version": encoder_code_version(encoder),
    }
    per_sample = {
        "crop_pixels": plan.crop_pixels, "sample_microns_per_pixel": sample.microns_per_pixel,
        "n_nuclei": int(n_nuclei), "input_digest": input_digest,
    }
    return identity_attrs(embedding, per_sample)


def encoder_code_version(encoder: PatchEncoder) -> str:
    """A network's numbers are pinned by its weights (weights_sha256); the handcrafted encoder's by its code."""
    return handcrafted.CODE_VERSION if encoder.spec.library == "handcrafted" else "none"


def embed_sample(sample: Sample, store: FeatureStore, encoder: PatchEncoder, settings: EmbedSettings,
                 progress: bool = True) -> EmbedReport:
    """Fill the cache entries (sample, encoder, each patch size); finished units are skipped."""
    start = time.perf_counter()
    # Recomputed (with the entries) if the sample's files changed.
    nuclei = store.nuclei(sample, progress=progress, max_tile=settings.max_tile)
    plans = patch_plans(sample, encoder, settings)
    entries = {key: store.create_entry(sample.name, entry_attrs(encoder, plan, sample, len(nuclei), settings,
                                                                sample.input_digest()))
               for key, plan in plans.items()}
    n_units = next(iter(entries.values())).n_units if entries else 0
    # Shard all units, not the pending ones: ranks that start at different moments see different pending sets,
    # and must still agree on who owns which unit.
    share = contiguous_share(list(range(n_units)), settings.rank, settings.world_size)
    computed, waiting_logged = 0, False
    while True:
        pending = set().union(*(set(e.pending_units().tolist()) for e in entries.values()))
        mine = [u for u in share if u in pending]
        if settings.max_units is not None:
            mine = mine[: settings.max_units]
        if not mine:
            break
        free = [u for u in mine if not locks.is_held(store.unit_lock(sample.name, encoder.name, u))]
        done_now = _embed_units(sample, store, encoder, settings, nuclei, entries, plans, free, progress) \
            if free else 0
        computed += done_now
        if settings.max_units is not None:
            break
        if done_now == 0:  # every unit left is locked by another live process: wait for it (or for its death)
            if not waiting_logged:
                log.warning("%s: waiting for %d chunk(s) that another process is computing", sample.name, len(mine))
                waiting_logged = True
            time.sleep(WAIT_POLL_S)
    return EmbedReport(sample.name, len(nuclei), n_units, computed, time.perf_counter() - start,
                       [e.path for e in entries.values()], encoder.name)


def _embed_units(sample: Sample, store: FeatureStore, encoder: PatchEncoder, settings: EmbedSettings, nuclei,
                 entries: dict[str, FeatureEntry], plans: dict[str, PatchPlan], mine: list[int],
                 progress: bool) -> int:
    """Compute the units of `mine` that no other process has claimed; returns how many this process computed."""
    claims = UnitClaims({u: store.unit_lock(sample.name, encoder.name, u) for u in mine},
                        [e.path / "done" for e in entries.values()], os.getpid())
    try:
        return _run_loader(sample, store, encoder, settings, nuclei, entries, plans, mine, claims, progress)
    finally:
        claims.release_own()


def _run_loader(sample: Sample, store: FeatureStore, encoder: PatchEncoder, settings: EmbedSettings, nuclei,
                entries: dict[str, FeatureEntry], plans: dict[str, PatchPlan], mine: list[int], claims: UnitClaims,
                progress: bool) -> int:
    normalizer = None
    if settings.stain_normalization == "macenko":
        from embed.stain import MacenkoNormalizer

        normalizer = MacenkoNormalizer.fit_sample(sample, nuclei)
    cuts = tuple(PatchCut.for_encoder(plan.crop_pixels, plan.input_size, encoder.spec.interpolation)
                 for plan in plans.values())
    # A table cached before tiles were capped may name bigger ones: read by capped tiles all the same.
    tile = min(store.tile_size(sample.name), settings.max_tile)
    device = next(iter(encoder.buffers())).device
    rows = [next(iter(entries.values())).unit_rows(u) for u in mine]
    workers = loader_workers(settings, device, encoder, n_nuclei=sum(r.stop - r.start for r in rows))
    model = torch.compile(encoder) if settings.compile else encoder
    encode_unit = UnitEncoder(model, plans, settings, device, {key: e.path / "done" for key, e in entries.items()})
    # Single-threaded encoders (the handcrafted one on a CPU) run in the workers, each on the units it cuts: the cores
    # work side by side. Otherwise the workers only cut and the main process encodes (with its threads, or the GPU).
    encode_in_workers = workers > 0 and device.type == "cpu" and cpu_threads(settings, encoder) == 1
    dataset = UnitPatchDataset(sample, nuclei, mine, settings.chunk_nuclei, cuts, tile, encoder.spec.use_mask,
                               settings.pad_mode, normalizer, claims, encode=encode_unit if encode_in_workers else None)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=2 if workers else None,
                        worker_init_fn=DieWithParent(os.getpid()) if workers else None)
    threads = cpu_threads(settings, encoder) if device.type == "cpu" else torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = progress_bar(total=sum(r.stop - r.start for r in rows), desc=f"{sample.name}: {encoder.name}",
                       unit="nucleus", enabled=progress)
    computed, units = 0, None
    try:
        units = iter(loader)
        for item in units:
            if isinstance(item, Exception):  # raised in a DataLoader worker (see UnitPatchDataset)
                raise item
            encoded = item.features if isinstance(item, UnitFeatures) else encode_unit(item)
            for key, entry in entries.items():
                if not entry.done[item.unit]:
                    entry.write_unit(item.unit, encoded[key])
            claims.release(item.unit)
            computed += 1
            bar.update(item.n_nuclei)
    except BaseException:
        if units is not None:
            _stop_workers(units)
        raise
    finally:
        bar.close()  # also on errors: the error message then starts on a line of its own
        torch.set_num_threads(previous_threads)
    return computed


def _stop_workers(units) -> None:
    """End a failed loop's DataLoader workers now: the units they still cut are of no use. Left to the iterator's
    own shutdown (run when the collector frees the error's traceback, which holds the iterator), a worker blocked
    handing over a unit that nobody reads any more was waited for 5 s before it was killed, and the caller's next
    step (the next sample, a notebook's next call) stalled that long. With pinned memory (CUDA) torch's own order
    stays: its pin-memory thread must stop before the workers do. Private names of torch's iterator, so a torch
    without them keeps its own shutdown; a failure here never hides the error being raised."""
    if getattr(units, "_pin_memory", True):
        return
    try:
        for worker in getattr(units, "_workers", ()):
            if worker.is_alive():
                worker.terminate()
        shutdown = getattr(units, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    except Exception:  # noqa: BLE001 - the loop's own error is the one to report
        log.debug("stopping the DataLoader workers failed", exc_info=True)


def loader_workers(settings: EmbedSettings, device: torch.device, encoder: PatchEncoder,
                   n_nuclei: int | None = None) -> int:
    """DataLoader workers: the setting; by default, for an encoder that runs on one thread on a CPU (the handcrafted
    one), one per core up to MAX_CPU_WORKERS, each cutting and encoding its own units, but no more than `n_nuclei`
    (the work to do) gives MIN_NUCLEI_PER_WORKER each, and none rather than one (a small crop is embedded in the
    process); otherwise none (a network on a CPU uses torch's threads in the main process; on a GPU raise --workers
    when cutting cannot keep it busy)."""
    if settings.num_workers is not None:
        return settings.num_workers
    if device.type == "cpu" and cpu_threads(settings, encoder) == 1:
        workers = min(MAX_CPU_WORKERS, os.cpu_count() or 1)
        if n_nuclei is not None:
            workers = min(workers, n_nuclei // MIN_NUCLEI_PER_WORKER)
        return workers if workers > 1 else 0
    return 0


@dataclass
class UnitEncoder:
    """UnitPatches -> {entry key: (n, dim) features} for the entries whose unit is not done yet (e.g. a patch size
    added to an existing cache). A module-level class, so DataLoader workers can receive it under any start method."""

    model: torch.nn.Module
    plans: dict[str, PatchPlan]
    settings: EmbedSettings
    device: torch.device
    done_arrays: dict[str, Path]

    def __call__(self, item: UnitPatches) -> dict[str, np.ndarray]:
        import zarr

        out = {}
        for key, plan in self.plans.items():
            if zarr.open_array(self.done_arrays[key], mode="r")[item.unit]:
                continue
            out[key] = encode_patches(self.model, item.patches[plan.crop_pixels], item.masks.get(plan.crop_pixels),
                                      self.settings, self.device, plan.input_size, plan.crop_pixels)
        return out


def cpu_threads(settings: EmbedSettings, encoder: PatchEncoder) -> int:
    """Encoder threads on a CPU: the setting; else one for the handcrafted encoder, torch's default for networks.
    The handcrafted features are many small operations, and torch's threads wait for each other at every one: on a
    2-core machine shared with other jobs, 2 threads ran the embed stage ~4x slower than 1 (44 vs 196 nuclei/s)."""
    if settings.torch_threads:
        return settings.torch_threads
    return 1 if encoder.spec.library == "handcrafted" else torch.get_num_threads()


def encode_patches(model, patches: torch.Tensor, masks: torch.Tensor | None, settings: EmbedSettings,
                   device: torch.device, input_size: int | None = None, crop: int | None = None) -> np.ndarray:
    """Run the frozen encoder over (n, 3, S, S) patches in batches; returns (n, dim) float32. `crop`: their edge on
    the slide where they were shrunk while cut (default S). With `settings.tta`, each patch's features are the mean
    over its 8 dihedral views (embed.tta)."""
    outputs, crop_views = [], views(settings.tta)
    use_autocast = settings.autocast and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for start in range(0, patches.shape[0], settings.batch_size):
            batch = patches[start: start + settings.batch_size].to(device, non_blocking=True)
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            mask = None if masks is None else masks[start: start + settings.batch_size].to(device, non_blocking=True)
            outputs.append(mean_over_views(model, batch, mask, crop_views, input_size, crop,
                                           channels_last=device.type == "cuda").cpu())
    return torch.cat(outputs).numpy()


def embed_dataset(data: str | Path, cache: str | Path, encoder_name: str = "handcrafted",
                  weights: str | Path | None = None, settings: EmbedSettings | None = None,
                  device: str | None = None, progress: bool = True,
                  microns_per_pixel: float | None = None, force_microns_per_pixel: bool = False,
                  elements: Elements | None = None) -> list[EmbedReport]:
    """Embed every sample under `data` (a sample zarr or a folder of them) into the cache at `cache`.

    `microns_per_pixel` serves samples that store no pixel size; one that disagrees with a stored size is refused
    unless `force_microns_per_pixel` (`slidedata.sample.open_sample`); `elements` names the samples' parts where
    they are not laid out as the challenge's. A cache that cannot be written is refused
    before any work; a disk that fills up on the way stops the stage with a DataError (`CacheDiskFull`): the chunks
    finished so far are kept, and a run after space is freed goes on from there.
    """
    settings = settings or EmbedSettings()
    check_writable(cache)
    check_writable(Path(cache).absolute().parent)  # the lock files live beside the cache (FeatureStore.locks)
    # The samples first: bad input is refused before weights load or the cache is created.
    samples = open_samples(data, microns_per_pixel=microns_per_pixel,
                           force_microns_per_pixel=force_microns_per_pixel, elements=elements)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    encoder = load_encoder(encoder_name, weights=weights, device=device)
    if device.startswith("cuda"):
        encoder = encoder.to(memory_format=torch.channels_last)
    try:
        store = FeatureStore(cache)
        return [embed_sample(sample, store, encoder, settings, progress=progress) for sample in samples]
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise CacheDiskFull(cache, "-", f"{exc.strerror or 'no space left'} while writing the feature cache; it stays "
                                        "resumable: free some space and run the embed stage again, which goes on "
                                        "from the chunks already finished") from exc


def embed_recipe(data: str | Path, cache: str | Path, recipe: Recipe, settings: EmbedSettings | None = None,
                 **options) -> list[EmbedReport]:
    """Embed every block of `recipe` (slidedata.recipe: what the fit stage reads by default), one encoder after the
    other, each at its patch sizes and input size (`settings.input_size`, where given, for every block).
    `options`: those of `embed_dataset` but the encoder's name and weights (each block's come with its package)."""
    settings = settings or EmbedSettings()
    reports = []
    for block in recipe.blocks:
        block_settings = replace(settings, patch_sizes=block.patch_sizes,
                                 input_size=settings.input_size or block.input_size)
        reports += embed_dataset(data, cache, block.encoder, settings=block_settings, **options)
    return reports
