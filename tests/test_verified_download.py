"""Every downloaded file is checked against the size and sha256 the hub announces before the partial folder
moves into place: a file cut short, a file altered, a damaged file left in the partial folder by an earlier
attempt, each downloaded again once and then refused; two downloads of the same model at once (threads), one
waiting for the other and using what it brought. Against the fake hub of test_download (no network)."""
import threading
from pathlib import Path

import pytest
import test_download as base
from test_download import NodeError, sha256, visible

from magnet import hub
from magnet.errors import MagnetError

fake_hub, models, ours = base.fake_hub, base.models, base.ours        # the fixtures, shared

T5 = "google-t5/t5-base"


def leftovers(folder: Path) -> list[str]:
    """What a download leaves beside the model folders besides them: hidden partial folders and lock files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def matches_the_hub(fake, repo: str, folder: Path) -> bool:
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    return all(p.read_bytes() == fake.repos[repo][n].read_bytes() for n, p in files.items()) and bool(files)


@pytest.mark.parametrize("damage", ["short", "altered"])
def test_a_damaged_file_is_downloaded_again_and_then_accepted(models, fake_hub, damage):
    fake_hub.damage["model.safetensors"] = [damage]
    lines = []
    dest = hub.download("t5-base", models / "text_encoders" / "t5-base", echo=lines.append)
    assert matches_the_hub(fake_hub, T5, dest)
    assert [f for _, f in fake_hub.fetched].count("model.safetensors") == 2
    again = [kw for f, kw in fake_hub.calls if f == "model.safetensors"][1]
    assert again.get("force_download") is True                        # not resumed from the damaged bytes
    said = [line for line in lines if "model.safetensors" in line and "again" in line]
    assert len(said) == 1
    size = fake_hub.repos[T5]["model.safetensors"].stat().st_size
    if damage == "short":
        assert f"{size // 2:,} bytes where the hub announces {size:,}" in said[0]
    else:
        assert f"where the hub announces {sha256(fake_hub.repos[T5]['model.safetensors'])}" in said[0]
    assert leftovers(models / "text_encoders") == []


@pytest.mark.parametrize("damage, words", [
    ("short", lambda size, sha: [f"{size // 2:,} bytes where the hub announces {size:,}"]),
    ("altered", lambda size, sha: ["sha256 ", f"where the hub announces {sha}"]),
])
def test_a_file_damaged_twice_is_refused_and_nothing_is_put_in_place(models, fake_hub, damage, words):
    fake_hub.damage["model.safetensors"] = [damage, damage]
    dest = models / "text_encoders" / "t5-base"
    with pytest.raises(MagnetError) as info:
        hub.download("t5-base", dest, echo=lambda line: None)
    text = str(info.value)
    src = fake_hub.repos[T5]["model.safetensors"]
    for w in ["model.safetensors", "t5-base", "try again later", f"python -m magnet download t5-base --dir {dest}",
              *words(src.stat().st_size, sha256(src))]:
        assert w in text, (w, text)
    assert not dest.exists() and visible(models / "text_encoders") == []
    partial = models / "text_encoders" / ".t5-base.partial"
    assert leftovers(models / "text_encoders") == [".t5-base.partial"]            # no lock file left
    assert not (partial / "model.safetensors").exists()                           # the damaged file deleted
    assert (partial / "config.json").is_file()                                    # what passed is kept
    # the next attempt takes what was kept and fetches the refused file and those after it
    fetched = len(fake_hub.fetched)
    assert hub.download("t5-base", dest, echo=lambda line: None) == dest and matches_the_hub(fake_hub, T5, dest)
    again = [f for _, f in fake_hub.fetched[fetched:]]
    assert again[0] == "model.safetensors" and "config.json" not in again


def test_the_node_refuses_a_release_damaged_twice_and_lists_nothing(ours, models, fake_hub):
    from magnet_node_pack.nodes.loaders import list_releases
    fake_hub.damage["state_dict.bin"] = ["short", "short"]
    with pytest.raises(NodeError, match=r"state_dict\.bin of magnet-small-10secs .* bytes where the hub announces"):
        ours["MagnetModelLoader"]().load("magnet-small-10secs", "cpu", "fp32", "if missing")
    assert list_releases("magnet") == [] and visible(models / "magnet") == []


@pytest.mark.parametrize("leftover", ["truncated", "altered"])
def test_a_damaged_file_left_in_the_partial_folder_is_downloaded_again(models, fake_hub, leftover):
    src = fake_hub.repos[T5]["model.safetensors"]
    partial = models / "text_encoders" / ".t5-base.partial"
    partial.mkdir()
    data = src.read_bytes()
    (partial / "model.safetensors").write_bytes(data[:1000] if leftover == "truncated"
                                                else data[:-1] + bytes([data[-1] ^ 1]))
    (partial / "config.json").write_bytes(fake_hub.repos[T5]["config.json"].read_bytes())     # complete
    lines = []
    dest = hub.download("t5-base", models / "text_encoders" / "t5-base", echo=lines.append)
    assert matches_the_hub(fake_hub, T5, dest) and leftovers(models / "text_encoders") == []
    names = [f for _, f in fake_hub.fetched]
    assert "model.safetensors" in names and "config.json" not in names           # the good one kept
    assert any("model.safetensors: the copy kept from an earlier attempt has" in line for line in lines)
    assert "  config.json: already downloaded" in lines


def test_without_sizes_from_the_hub_the_download_says_so_and_goes_ahead(models, fake_hub, monkeypatch):
    monkeypatch.setattr(hub, "_expected", lambda *a: None)
    lines = []
    dest = hub.download("t5-base", models / "text_encoders" / "t5-base", echo=lines.append)
    assert any("not checked here, loading the model checks them" in line for line in lines)
    assert matches_the_hub(fake_hub, T5, dest)


def test_a_file_the_hub_gives_no_size_for_is_named_and_not_checked(models, fake_hub, monkeypatch):
    real = hub._expected
    monkeypatch.setattr(hub, "_expected", lambda *a: {**real(*a), "spiece.model": hub.Expected(None, None)})
    fake_hub.damage["spiece.model"] = ["short"]
    lines = []
    dest = hub.download("t5-base", models / "text_encoders" / "t5-base", echo=lines.append)
    assert any("does not tell the size of spiece.model: loading the model checks it" in line for line in lines)
    assert (dest / "spiece.model").is_file()


def _together(fake_hub, dest: Path, n: int = 2):
    """`n` threads downloading t5-base into `dest` at once; the downloading one is held until another one
    says it waits. -> [(result or exception, its lines)]."""
    fake_hub.gate = threading.Event()
    out: list = [None] * n

    def one(i):
        lines = []

        def echo(line):
            lines.append(line)
            if line.startswith("waiting for another download"):
                fake_hub.gate.set()
        try:
            out[i] = (hub.download("t5-base", dest, echo=echo), lines)
        except Exception as e:                     # noqa: BLE001  (reported to the test)
            out[i] = (e, lines)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return out


def test_two_downloads_at_once_one_waits_and_uses_what_the_other_brought(models, fake_hub):
    dest = models / "text_encoders" / "t5-base"
    results = _together(fake_hub, dest)
    assert [r for r, _ in results] == [dest, dest]
    assert matches_the_hub(fake_hub, T5, dest) and leftovers(models / "text_encoders") == []
    names = [f for _, f in fake_hub.fetched]
    assert len(names) == len(set(names))                                       # each file fetched once
    waited = [lines for _, lines in results if any(line.startswith("waiting") for line in lines)]
    assert len(waited) == 1 and f"t5-base arrived in {dest} from another download" in waited[0]
    assert fake_hub.info_calls == 1                                            # the waiting one asked nothing


def test_when_the_first_download_fails_the_waiting_one_downloads_itself(models, fake_hub):
    dest = models / "text_encoders" / "t5-base"
    fake_hub.damage["model.safetensors"] = ["short", "short"]                   # the first one refuses it
    results = _together(fake_hub, dest)
    errors = [r for r, _ in results if isinstance(r, MagnetError)]
    assert len(errors) == 1 and "model.safetensors" in str(errors[0])
    assert [r for r, _ in results if not isinstance(r, Exception)] == [dest]
    assert matches_the_hub(fake_hub, T5, dest) and leftovers(models / "text_encoders") == []


def test_the_lock_is_exclusive_and_its_file_goes_with_its_holder(tmp_path):
    first, second = hub._FolderLock(tmp_path / ".x.lock"), hub._FolderLock(tmp_path / ".x.lock")
    assert first.acquire(blocking=False)
    assert not second.acquire(blocking=False)
    first.release()
    assert not (tmp_path / ".x.lock").exists()
    assert second.acquire(blocking=False)
    second.release()
    assert list(tmp_path.iterdir()) == []
