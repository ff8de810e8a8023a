"""Text-referred video segmentation: ``segment_video(model, video, prompts)`` gives per-frame masks for each prompt.

Families that track objects (``capabilities.video_tracking``, e.g. SAM 3) follow them from frame to frame through
``Family.track_video``; the others run ``segment``'s stages on batches of frames (the image encoder once per frame,
each prompt encoded once per video), with optional temporal smoothing of the probabilities. Frames are read lazily
(a folder of images, a video file through PyAV, an array or any iterable of frames) and masks can be written as
they come, so a long video never sits in memory.

    masks = vlseg.segment_video(model, "clip.mp4", ["the grasper"])            # (T, K, H, W) bool
    vlseg.segment_video(model, "clip.mp4", ["the grasper"], out="masks/")      # clip__the_grasper.mp4, ...
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .io import IMAGE_EXTS, VIDEO_EXTS, read_image, to_uint8_rgb

#: frame images inside a frames folder (DICOM frames are not video)
FRAME_EXTS = tuple(e for e in IMAGE_EXTS if e != ".dcm")


def _av() -> Any:
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError("reading and writing video files needs PyAV: pip install 'vlseg[video]'") from e
    return av


def is_video_path(path: str | os.PathLike[str]) -> bool:
    """A video file by its extension."""
    return str(path).lower().endswith(VIDEO_EXTS)


def _natural_key(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def frame_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of a frames folder in natural order (frame_2 before frame_10)."""
    files = sorted((f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in FRAME_EXTS),
                   key=_natural_key)
    if not files:
        raise ValueError(f"no frame images ({', '.join(FRAME_EXTS)}) in {folder}")
    return files


@dataclass
class VideoSource:
    """Frames to read lazily.

    Attributes:
        frames: an iterable of (H, W, 3) uint8 arrays, decoded as it is iterated (once).
        fps: frames per second (the file's, or None when unknown).
        num_frames: the frame count when known in advance (for progress bars), else None.
        name: a name for outputs (the file or folder stem).
    """

    frames: Iterable[np.ndarray]
    fps: float | None = None
    num_frames: int | None = None
    name: str = "video"


def _file_frames(path: Path) -> Iterator[np.ndarray]:
    av = _av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame.to_ndarray(format="rgb24")


def _folder_frames(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:
        yield read_image(f)[0]


def open_video(video: Any) -> VideoSource:
    """A video file (mp4, avi, mov, mkv, webm, ...; PyAV), a folder of frame images, a (T, H, W[, C]) array, a
    list of frames (arrays, PIL images or paths) or any iterable of frames -> VideoSource (nothing decoded yet)."""
    if isinstance(video, VideoSource):
        return video
    if isinstance(video, (str, os.PathLike)):
        p = Path(video)
        if not p.exists():
            raise ValueError(f"video not found: {p}")
        if p.is_dir():
            files = frame_files(p)
            return VideoSource(_folder_frames(files), None, len(files), p.name)
        if not is_video_path(p):
            raise ValueError(f"{p} is not a video file ({', '.join(VIDEO_EXTS)}) or a folder of frames")
        av = _av()
        try:
            with av.open(str(p)) as c:
                s = c.streams.video[0]
                fps = float(s.average_rate) if s.average_rate else None
                n = int(s.frames) or None
        except (av.error.FFmpegError, IndexError) as e:  # type: ignore[attr-defined]
            raise ValueError(f"unreadable video file {p}: {e}") from e
        return VideoSource(_file_frames(p), fps, n, p.name.rsplit(".", 1)[0])
    if isinstance(video, np.ndarray):
        if video.ndim not in (3, 4):
            raise ValueError(f"a video array is (T, H, W) or (T, H, W, C), got shape {video.shape}")
        return VideoSource((to_uint8_rgb(f, f"frame {i}") for i, f in enumerate(video)), None, len(video))
    if isinstance(video, Iterable):
        n = len(video) if isinstance(video, Sequence) else None
        return VideoSource((read_image(f)[0] for f in video), None, n)
    raise ValueError(f"not a video: {type(video).__name__} (pass a video file, a frames folder, a (T, H, W[, C]) "
                     "array or a list of frames)")


# ----------------------------------------------------------------------------- writing
class MaskVideoWriter:
    """Writes masks as they come: per prompt a lossless mask video (``<stem>__<name>.mp4``, 0/255 grey, H.264
    lossless) or a PNG sequence (``<stem>__<name>/000000.png``), plus an overlay video/sequence.

    Args:
        out: the output folder.  stem: file-name stem.  names: one file-safe name per prompt.
        fmt: ``"mp4"`` or ``"png"``.  fps: frame rate of written videos (default 25).  overlay: also write the
            frames with the masks drawn on them.
    """

    def __init__(self, out: str | os.PathLike[str], stem: str, names: Sequence[str], fmt: str = "mp4",
                 fps: float | None = None, overlay: bool = True):
        if fmt not in ("mp4", "png"):
            raise ValueError(f"video output format is 'mp4' or 'png', got {fmt!r}")
        self.out, self.stem, self.names, self.fmt = Path(out), stem, list(names), fmt
        self.fps = fps or 25.0
        self.overlay = overlay
        self.count = 0
        self._containers: list[Any] = []
        self._streams: list[Any] = []
        self.out.mkdir(parents=True, exist_ok=True)

    def targets(self) -> list[Path]:
        """Paths this writer creates (one per prompt, then the overlay)."""
        names = self.names + (["overlay"] if self.overlay else [])
        suffix = ".mp4" if self.fmt == "mp4" else ""
        return [self.out / f"{self.stem}__{n}{suffix}" for n in names]

    def _open(self, h: int, w: int) -> None:
        if self.fmt == "png":
            for t in self.targets():
                t.mkdir(parents=True, exist_ok=True)
            return
        from fractions import Fraction

        av = _av()
        rate = Fraction(self.fps).limit_denominator(1001)
        for j, t in enumerate(self.targets()):
            c = av.open(str(t), mode="w")
            is_mask = j < len(self.names)
            s = c.add_stream("libx264", rate=rate)
            s.width, s.height = w + w % 2, h + h % 2  # 4:2:0 needs even sides (padded, cropped on reading)
            s.pix_fmt = "yuv420p"
            # masks: lossless (qp 0), so a decoded frame is exactly 0/255; overlays: ordinary quality
            s.options = {"qp": "0", "preset": "veryfast"} if is_mask else {"crf": "20", "preset": "veryfast"}
            self._containers.append(c)
            self._streams.append(s)

    def write(self, frame: np.ndarray, masks: np.ndarray) -> None:
        """One frame (H, W, 3) uint8 and its (K, H, W) bool masks."""
        h, w = masks.shape[-2:]
        if self.count == 0:
            self._open(h, w)
        arrays = [m.astype(np.uint8) * 255 for m in masks]
        if self.overlay:
            from .visualize import overlay_masks

            arrays.append(overlay_masks(frame, masks))
        if self.fmt == "png":
            from PIL import Image

            for t, a in zip(self.targets(), arrays):
                Image.fromarray(a).save(t / f"{self.count:06d}.png")
        else:
            av = _av()
            for a, c, s in zip(arrays, self._containers, self._streams):
                rgb = a if a.ndim == 3 else np.repeat(a[..., None], 3, -1)
                rgb = np.pad(rgb, ((0, s.height - h), (0, s.width - w), (0, 0)), mode="edge")
                for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                    c.mux(packet)
        self.count += 1

    def close(self) -> list[Path]:
        for c, s in zip(self._containers, self._streams):
            for packet in s.encode():
                c.mux(packet)
            c.close()
        self._containers, self._streams = [], []
        return self.targets() if self.count else []


def read_mask_video(path: str | os.PathLike[str], size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask video or PNG sequence written by ``segment_video`` -> (T, H, W) bool (cropped to ``size``)."""
    p = Path(path)
    frames = [read_image(f)[0] for f in frame_files(p)] if p.is_dir() else list(_file_frames(p))
    out = np.stack([f[..., 0] > 127 for f in frames])
    return out if size is None else out[:, : size[0], : size[1]]


# ----------------------------------------------------------------------------- segmenting
@dataclass
class VideoFrameMasks:
    """One frame's result.

    Attributes:
        index: frame number (from 0).  masks: (K, H, W) bool, one per prompt.
        objects: for tracking families, per prompt the tracked objects on this frame: ``ids`` (N,) (stable across
            frames), ``scores`` (N,), ``boxes`` (N, 4) xyxy pixels, ``masks`` (N, H, W); else None.
        frame: the (H, W, 3) uint8 frame (only when asked for).
    """

    index: int
    masks: np.ndarray
    objects: list[dict[str, np.ndarray]] | None = None
    frame: np.ndarray | None = field(default=None, repr=False)


def iter_segment_video(model: Any, video: Any, prompts: str | Sequence[str], threshold: float = 0.5,
                       presence_threshold: Any = "model", batch_size: int = 8, smoothing: float = 0.0,
                       track: bool | None = None, tracker_options: dict[str, Any] | None = None,
                       max_frames: int | None = None, keep_frames: bool = False, progress: bool = True,
                       precision: str = "fp32", flip: Any = "model") -> Iterator[VideoFrameMasks]:
    """Yield one ``VideoFrameMasks`` per frame, in order, reading frames as it goes (see ``segment_video``)."""
    from tqdm.auto import tqdm

    from .inference import _gate, _run, flip_enabled, presence_cutoff, with_precision
    from .model import VLSegModel, normalize_prompts

    if not isinstance(model, VLSegModel):
        raise TypeError(f"segment_video() needs a VLSegModel, got {type(model).__name__}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    normalize_prompts(prompts, 1)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing is an exponential-average weight in [0, 1), got {smoothing}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    use_flip = flip_enabled(model, flip)  # a bad value, or flip for a family that tracks instances, fails here
    src = open_video(video)
    frames: Iterable[np.ndarray] = src.frames
    total = src.num_frames
    if max_frames is not None:
        frames = (f for i, f in zip(range(max_frames), frames))
        total = max_frames if total is None else min(total, max_frames)
    bar = tqdm(total=total, desc=f"segment {src.name}", unit="frame", disable=not progress, leave=False)
    kept: dict[int, np.ndarray] = {}

    def remember(it: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for i, f in enumerate(it):
            f = to_uint8_rgb(np.asarray(f), f"frame {i}")
            if keep_frames:
                kept[i] = f
            bar.update(1)
            yield f

    tracking = model.family.capabilities.video_tracking if track is None else track
    try:
        if tracking:
            try:
                for r in model.family.track_video(model, remember(frames), prompts, threshold,
                                                  **(tracker_options or {})):
                    yield VideoFrameMasks(r["index"], r["masks"], r.get("objects"), kept.pop(r["index"], None))
                return
            except NotImplementedError as e:
                if track:
                    raise ValueError(f"this model cannot track objects in videos: {e}") from e
                warnings.warn(f"{e}; segmenting frame by frame instead", stacklevel=2)
                # nothing was consumed: track_video raises before reading frames
        cutoff = presence_cutoff(model, presence_threshold)
        run = with_precision(model, precision)
        state: tuple[np.ndarray, np.ndarray | None] | None = None
        index = 0
        batch: list[np.ndarray] = []

        def flush() -> Iterator[VideoFrameMasks]:
            nonlocal state, index
            for probs, presence in _run(run, batch, prompts, len(batch), False, use_flip):
                if smoothing and state is not None and state[0].shape == probs.shape:
                    probs = smoothing * state[0] + (1 - smoothing) * probs
                    if presence is not None and state[1] is not None:
                        presence = smoothing * state[1] + (1 - smoothing) * presence
                state = (probs, presence)
                yield VideoFrameMasks(index, _gate(probs, presence, threshold, cutoff), None, kept.pop(index, None))
                index += 1
            batch.clear()

        for f in remember(frames):
            batch.append(f)
            if len(batch) == batch_size:
                yield from flush()
        if batch:
            yield from flush()
    finally:
        bar.close()


def segment_video(model: Any, video: Any, prompts: str | Sequence[str], threshold: float = 0.5,
                  presence_threshold: Any = "model", batch_size: int = 8, smoothing: float = 0.0,
                  track: bool | None = None, tracker_options: dict[str, Any] | None = None,
                  max_frames: int | None = None, out: str | os.PathLike[str] | None = None, out_format: str = "mp4",
                  names: Sequence[str] | None = None, stem: str | None = None, overlay: bool = True,
                  progress: bool = True, precision: str = "fp32", flip: Any = "model") -> Any:
    """Segment what the prompts describe in every frame of a video.

    Args:
        model: a VLSegModel.
        video: a video file (mp4, avi, mov, mkv, webm; needs ``pip install 'vlseg[video]'``), a folder of frame
            images (natural order), a (T, H, W[, C]) array, or a list / iterable of frames.
        prompts: one string or K strings.
        threshold: probability above which a pixel is foreground.
        presence_threshold: as in ``vlseg.segment`` (frame-by-frame families).
        batch_size: frames per forward pass (frame-by-frame families).
        smoothing: frame-by-frame families: exponential average of the probabilities over time,
            p'_t = smoothing * p'_{t-1} + (1 - smoothing) * p_t (0 = off).
        track: None: track objects when the family can (SAM 3), else frame by frame; True: require tracking;
            False: always frame by frame.
        tracker_options: settings of the family's tracker for this call (SAM 3: ``score_threshold_detection``,
            ``new_det_thresh``, ``hotstart_delay``, ...).
        max_frames: stop after this many frames.
        precision, flip: as in ``vlseg.segment`` (frame-by-frame families).
        out: a folder: masks are written as they come (nothing is kept in memory) and the written paths are
            returned; None: the masks are returned.
        out_format: ``"mp4"`` (lossless mask videos + an overlay video) or ``"png"`` (PNG sequences).
        names: file-safe names per prompt for the outputs (default: made from the prompts).
        stem: the outputs' file-name stem (default: the video's name); files are ``<stem>__<name>.mp4``.
        overlay: also write the frames with the masks drawn on them.
        progress: show a progress bar (tqdm).
    Returns:
        (T, K, H, W) bool masks, or with ``out`` the list of files / folders written.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kw = dict(threshold=threshold, presence_threshold=presence_threshold, batch_size=batch_size,
              smoothing=smoothing, track=track, tracker_options=tracker_options, max_frames=max_frames,
              progress=progress, precision=precision, flip=flip)
    if out is None:
        return np.stack([r.masks for r in iter_segment_video(model, video, prompts, **kw)])
    from .naming import unique_slugs

    src = open_video(video)
    names = list(names) if names is not None else unique_slugs(prompts, taken={"overlay"})
    writer = MaskVideoWriter(out, stem or src.name, names, out_format, src.fps, overlay)
    try:
        for r in iter_segment_video(model, src, prompts, keep_frames=overlay, **kw):
            writer.write(r.frame if r.frame is not None else np.zeros((*r.masks.shape[-2:], 3), np.uint8), r.masks)
    finally:
        written = writer.close()
    return written


__all__ = [
    "FRAME_EXTS",
    "VIDEO_EXTS",
    "MaskVideoWriter",
    "VideoFrameMasks",
    "VideoSource",
    "frame_files",
    "is_video_path",
    "iter_segment_video",
    "open_video",
    "read_mask_video",
    "segment_video",
]
