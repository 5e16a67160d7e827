"""bench/adapt_demo.py, the adaptive-thinking table of the README: its arithmetic (length and accuracy
change against plain GRPO, per seed and mean) and its measurement (the four prompt modes, the cache)."""
import importlib.util
import json
import os

import checkpoint as CK
import evaluate as E
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_demo():
    spec = importlib.util.spec_from_file_location("adapt_demo", os.path.join(ROOT, "bench", "adapt_demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def fake_run(path, accuracy, length):
    """A run directory whose measurement is already cached (newer than its weights): every mode gets the
    same numbers, the table only reads them."""
    os.makedirs(path)
    open(os.path.join(path, "model.safetensors"), "w").close()
    mode = {"accuracy": accuracy, "mean_length": length, "thinking/rate": 0.5, "thinking/accuracy/easy": 1.0,
            "thinking/accuracy/hard": 0.5, "thinking/length/easy": 14.0, "thinking/length/hard": 36.0}
    with open(os.path.join(path, "adapt_measure.json"), "w") as f:
        json.dump({**{m: mode for m in ("free", "[Easy]", "[Hard]", "prefilled")},
                   "router": {"auc": 0.99, "errors_greedy": 7, "errors_best": 5, "n_easy": 4, "n_hard": 4}}, f)
    t = os.path.getmtime(os.path.join(path, "model.safetensors"))
    os.utime(os.path.join(path, "adapt_measure.json"), (t + 1, t + 1))


def test_summary_is_the_change_against_plain_per_seed(tmp_path, capsys):
    """Seed 0: plain 32 tokens at 100%, the run 19.2 at 99% -> -40.0%, -1.0 point; seed 1: plain 30 at 98%,
    the run 15 at 97% -> -50.0%, -1.0; means -45.0% and -1.0 (by hand)."""
    for s, (plain, run) in enumerate((((1.0, 32.0), (0.99, 19.2)), ((0.98, 30.0), (0.97, 15.0)))):
        fake_run(str(tmp_path / f"sft-s{s}"), 0.9, 25.0)
        fake_run(str(tmp_path / f"plain-s{s}"), *plain)
        fake_run(str(tmp_path / f"adaptthink-d10-s{s}"), *run)
    load_demo().main(["--measure-only", "--seeds", "0", "1", "--runs", "plain", "adaptthink-d10",
                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert ("adaptthink-d10 vs plain, free prompts: length -45.0% (-40.0, -50.0), accuracy -1.0 points (-1.0, -1.0)"
            in out)
    # a table cell is the mean over seeds, then each seed: accuracy in %, length in tokens
    assert "| plain (free) | 99.0 (100.0, 98.0) | 31.0 (32.0, 30.0) |" in out
    assert "plain router: auc 0.9900 (0.9900, 0.9900), routing errors greedy 7, 7, best threshold 5, 5 (of 4 easy + 4 hard)" in out
    table = json.load(open(tmp_path / "adapt_demo.json"))
    assert table["1"]["adaptthink-d10"]["free"]["mean_length"] == 15.0


def test_separation_by_hand():
    """easy scores 1, -0.5, 2; hard -1, 0.5. Pairs with easy above hard: 5 of 6. Threshold 0 (greedy):
    easy -0.5 and hard 0.5 are routed wrong (2); threshold 0.5: only easy -0.5 (1); -1: only hard 0.5 (1)."""
    r = load_demo().separation([1.0, -0.5, 2.0], [-1.0, 0.5])
    assert r == {"auc": 5 / 6, "errors_greedy": 2, "errors_best": 1, "n_easy": 3, "n_hard": 2}
    # perfectly separated, and all on one side of 0: greedy routes every hard one wrong, a threshold none
    assert load_demo().separation([3.0, 2.0], [1.0])["errors_greedy"] == 1
    assert load_demo().separation([3.0, 2.0], [1.0])["errors_best"] == 0


def test_measure_modes_and_cache(tmp_path, monkeypatch):
    """On a (random) tiny model: the four modes, each on the same n problems; "prefilled" completions all
    open with [Easy]<think></think> (the pre-filled tokens are part of the completion, so the tag and skip rates
    are exactly 1, the thinking rate exactly 0); a second call reads the cache and generates nothing."""
    model, tok = M.load("tiny")
    CK.save(model, tok, str(tmp_path / "m"))
    demo = load_demo()
    out = demo.measure(str(tmp_path / "m"), n=8)
    assert set(out) == {"free", "[Easy]", "[Hard]", "prefilled", "router"}
    assert out["router"]["n_easy"] + out["router"]["n_hard"] == 8
    assert out["router"]["errors_best"] <= out["router"]["errors_greedy"] and 0.0 <= out["router"]["auc"] <= 1.0
    assert out["prefilled"]["thinking/tag_rate/easy"] == out["prefilled"]["thinking/skip_rate"] == 1.0
    assert out["prefilled"]["thinking/rate"] == 0.0
    for k, m in out.items():
        assert k == "router" or 0.0 <= m["accuracy"] <= 1.0 and 1.0 <= m["mean_length"] <= 48 + 1

    def no_generation(*a, **k):
        raise AssertionError("the cached measurement should be read, not recomputed")
    monkeypatch.setattr(E, "complete", no_generation)
    assert demo.measure(str(tmp_path / "m"), n=8) == json.loads(json.dumps(out))
    # a cache written before the router was measured: the router is added, nothing else recomputed
    path = tmp_path / "m" / "adapt_measure.json"
    old = {k: v for k, v in json.load(open(path)).items() if k != "router"}
    path.write_text(json.dumps(old))
    again = demo.measure(str(tmp_path / "m"), n=8)
    assert again == {**old, "router": out["router"]} and json.load(open(path)) == again
