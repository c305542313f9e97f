"""Fitting audio to a video: its duration (core VIDEO, an IMAGE batch with its fps, or VHS video info) and
an exact-length AUDIO."""
from __future__ import annotations

from collections.abc import Mapping

from ..magnet.audio import fit_length, seconds_to_samples
from ..magnet.errors import MagnetError
from .common import CATEGORY, audio_in, audio_out, user_errors


def video_duration(video=None, images=None, fps: float = 0.0, video_info=None) -> float:
    """Seconds of video from whichever input is connected (VIDEO first, then VHS info, then frames/fps)."""
    if video is not None:
        if hasattr(video, "get_duration"):
            return float(video.get_duration())
        comps = video.get_components()
        return comps.images.shape[0] / float(comps.frame_rate)
    if video_info is not None:
        if not isinstance(video_info, Mapping):
            raise MagnetError("input `video_info` is not VHS video info: connect VHS Load Video's video_info.")
        if video_info.get("loaded_duration"):
            return float(video_info["loaded_duration"])
        return float(video_info["loaded_frame_count"]) / float(video_info["loaded_fps"])
    if images is not None:
        if not fps or fps <= 0:
            raise MagnetError("input `fps` must be > 0 to turn the `images` frame count into seconds: set it "
                              "to the video's frame rate.")
        return images.shape[0] / float(fps)
    raise MagnetError("connect one of `video` (core VIDEO), `video_info` (VHS Load Video) or `images` (+ `fps`).")


class MagnetVideoDuration:
    """The duration in seconds of a video, for the sampler's `duration` input."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {},
                "optional": {
                    "video": ("VIDEO",),
                    "images": ("IMAGE",),
                    "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                      "tooltip": "frame rate of `images` (only used with `images`)"}),
                    "video_info": ("VHS_VIDEOINFO",),
                }}

    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("duration",)
    FUNCTION = "duration"
    CATEGORY = CATEGORY

    def duration(self, video=None, images=None, fps=0.0, video_info=None):
        with user_errors("MAGNeT Video Duration"):
            seconds = video_duration(video, images, fps, video_info)
            if not seconds > 0:
                raise MagnetError(f"the video is {seconds:g} s long: connect a video with frames.")
            return (seconds,)


class MagnetFitAudioLength:
    """Trim or pad AUDIO with silence to exactly round(duration * sample_rate) samples."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO",),
            "duration": ("FLOAT", {"default": 10.0, "min": 0.01, "max": 36000.0, "step": 0.01,
                                   "tooltip": "seconds; connect MAGNeT Video Duration to fit a video exactly"}),
        }}

    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "fit"
    CATEGORY = CATEGORY

    def fit(self, audio, duration):
        node = "MAGNeT Fit Audio Length"
        with user_errors(node):
            wav, sr = audio_in(audio, node)
            return (audio_out(fit_length(wav, seconds_to_samples(duration, sr)), sr),)
