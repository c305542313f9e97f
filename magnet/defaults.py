"""The published generation defaults, in one table: what each kind of official release stores in its xp.cfg
`generate.lm` (audiocraft's config/solver/magnet/magnet_32khz.yaml and audio_magnet_16khz.yaml), and the
limit on decoding steps.

The engine reads each release's own values (`sampling.release_value`, `sampling.release_steps`) and falls back
to the music values (`MUSIC_DEFAULTS`, `DEFAULT_STEPS`) where a release stores none. Help texts and tooltips
that quote the defaults are made from `KINDS` (`per_release`), so they cannot drift from it."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STEPS = (20, 10, 10, 10)    # decoding steps per codebook: the paper's, the 10 s releases' and audio-magnet's
LONG_STEPS = (60, 10, 10, 10)       # the 30 s music releases'
MAX_STEPS = 1000                    # per codebook, the most the engine accepts (the releases use 10 to 60)

# The music releases' sampling settings: the engine's fallback for a release that stores none.
MUSIC_DEFAULTS = {"temperature": 3.0, "top_k": 0, "top_p": 0.9, "max_cfg_coef": 10.0, "min_cfg_coef": 1.0,
                  "span_arrangement": "nonoverlap", "span_scoring": "max"}


@dataclass(frozen=True)
class ReleaseKind:
    """One kind of official release: what texts call it, its releases, and the settings it was published
    with (every `SamplingParams` field that defaults to the release's own, `decoding_steps` included)."""
    label: str
    releases: tuple[str, ...]
    settings: dict


KINDS = {
    "music": ReleaseKind("the 10 s music releases", ("magnet-small-10secs", "magnet-medium-10secs"),
                         {**MUSIC_DEFAULTS, "decoding_steps": DEFAULT_STEPS}),
    "music-30s": ReleaseKind("the 30 s music releases", ("magnet-small-30secs", "magnet-medium-30secs"),
                             {**MUSIC_DEFAULTS, "decoding_steps": LONG_STEPS}),
    "sound": ReleaseKind("audio-magnet", ("audio-magnet-small", "audio-magnet-medium"),
                         {**MUSIC_DEFAULTS, "temperature": 3.5, "top_p": 0.8, "max_cfg_coef": 20.0,
                          "decoding_steps": DEFAULT_STEPS}),
}


def kind_of(release: str) -> str | None:
    """The kind ('music', 'music-30s', 'sound') of an official release name; None for any other name."""
    name = str(release).rstrip("/\\").replace("\\", "/").split("/")[-1]
    return next((k for k, v in KINDS.items() if name in v.releases), None)


def value_text(name: str, value) -> str:
    """How texts write a setting: steps as 20,10,10,10, a temperature with its decimal (3.0), other numbers
    short (10, 0.9)."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if name == "temperature":
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _who(kinds: list[str]) -> str:
    if set(kinds) == set(KINDS):
        return "every release"
    if set(kinds) == {"music", "music-30s"}:
        return "the music releases"
    return " and ".join(KINDS[k].label for k in kinds)


def per_release(*names: str, join: str = ",") -> str:
    """What the releases use for a setting (or several, written joined by `join`: e.g. max_cfg_coef and
    min_cfg_coef as '10,1'), the kinds that agree merged: '3.0 for the music releases, 3.5 for audio-magnet',
    '0 in every release'."""
    groups: dict[str, list[str]] = {}
    for kind, k in KINDS.items():
        text = join.join(value_text(n, k.settings[n]) for n in names)
        groups.setdefault(text, []).append(kind)
    if len(groups) == 1:
        return f"{next(iter(groups))} in every release"
    return ", ".join(f"{text} for {_who(kinds)}" for text, kinds in groups.items())


def fallback(*names: str, join: str = ",") -> str:
    """The engine's value for a release that stores none (the music releases')."""
    settings = {**MUSIC_DEFAULTS, "decoding_steps": DEFAULT_STEPS}
    return join.join(value_text(n, settings[n]) for n in names)
