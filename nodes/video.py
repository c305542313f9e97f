"""Fitting audio to a video: its duration (core VIDEO, an IMAGE batch with its fps, or VHS video info) and
an exact-length AUDIO."""
from __future__ import annotations

import math
from collections.abc import Mapping

from ..magnet.audio import fit_length, seconds_to_samples
from ..magnet.errors import MagnetError
from .common import CATEGORY, audio_in, audio_out, finite, user_errors


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
        fps = finite(fps, "fps")
        if fps <= 0:
            raise MagnetError("input `fps` must be > 0 to turn the `images` frame count into seconds: set it "
                              "to the video's frame rate.")
        return images.shape[0] / float(fps)
    raise MagnetError("connect one of `video` (core VIDEO), `video_info` (VHS Load Video) or `images` (+ `fps`).")


class MagnetVideoDuration:
    """The duration in seconds of a video, for the sampler's `duration` input."""

    DISPLAY_NAME = "MAGNeT Video Duration"
    DESCRIPTION = ("The length in seconds of a video (core VIDEO, VideoHelperSuite's video_info, or an IMAGE "
                   "batch at an fps), for the Sampler's and Fit Audio Length's duration inputs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {},
                "optional": {
                    "video": ("VIDEO", {"tooltip": "a core VIDEO (LoadVideo); used first when connected"}),
                    "images": ("IMAGE", {"tooltip": "video frames (an IMAGE batch); needs `fps`"}),
                    "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                      "tooltip": "frame rate of `images` (only used with `images`), e.g. 24"}),
                    "video_info": ("VHS_VIDEOINFO", {"tooltip": "VideoHelperSuite Load Video's video_info"}),
                }}

    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("duration",)
    OUTPUT_TOOLTIPS = ("seconds: connect to the Sampler's and Fit Audio Length's duration",)
    FUNCTION = "duration"
    CATEGORY = CATEGORY

    def duration(self, video=None, images=None, fps=0.0, video_info=None):
        with user_errors(self.DISPLAY_NAME):
            try:
                seconds = video_duration(video, images, fps, video_info)
            except MagnetError:
                raise
            except (ZeroDivisionError, KeyError, TypeError, ValueError, AttributeError) as e:
                # a video without frames or frame rate, or info from another node pack: the input's fault
                raise MagnetError(f"could not read the video's duration ({type(e).__name__}: {e}). Connect a "
                                  f"video with frames and a frame rate.") from None
            if not (seconds > 0 and math.isfinite(seconds)):
                raise MagnetError(f"the video is {seconds:g} s long: connect a video with frames.")
            return (seconds,)


class MagnetFitAudioLength:
    """Trim or pad AUDIO with silence to exactly round(duration * sample_rate) samples."""

    DISPLAY_NAME = "MAGNeT Fit Audio Length"
    DESCRIPTION = ("Trims audio, or pads it with silence at the end, to exactly round(duration x sample rate) "
                   "samples, so a soundtrack ends with its video.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "any ComfyUI AUDIO (e.g. from MAGNeT Decode Audio)"}),
            "duration": ("FLOAT", {"default": 10.0, "min": 0.01, "max": 36000.0, "step": 0.01,
                                   "tooltip": "seconds; connect MAGNeT Video Duration to fit a video exactly"}),
        }}

    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    OUTPUT_TOOLTIPS = ("the AUDIO, exactly `duration` seconds long",)
    FUNCTION = "fit"
    CATEGORY = CATEGORY

    def fit(self, audio, duration):
        with user_errors(self.DISPLAY_NAME):
            duration = finite(duration, "duration")
            if duration <= 0:
                raise MagnetError(f"input `duration` is {duration:g} s: it must be more than 0 (connect MAGNeT "
                                  f"Video Duration).")
            wav, sr = audio_in(audio)
            return (audio_out(fit_length(wav, seconds_to_samples(duration, sr)), sr),)
