"""A checkpoint on disk: written atomically, checked with checksums at load, with the training state
(optimizer, step, data position, every random stream) beside the model so that a resumed run is the
uninterrupted one.

    save(model, tok, "runs/x", state)    # OUT/ is then a plain HF checkpoint + trainer_state/state.pt
    state = load_state("runs/x")         # the training state (model.load reads the weights)
    rng_state() / set_rng_state(s)       # python, numpy, torch and CUDA generators
"""
import errno
import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch

# -----------------------------------------------------------------------------
# Saving. The output directory is a plain HF checkpoint (model.safetensors, config.json,
# generation_config.json, tokenizer files, chat template); the training state (optimizer, step, RNG,
# data position) lives in trainer_state/ beside it so from_pretrained never sees it. Logs
# (metrics.jsonl, ...) share the directory, so the checkpoint cannot be swapped in by renaming the
# directory itself; instead a small journal makes the swap all-or-nothing:
#   1. write the whole new checkpoint to OUT/.ckpt-tmp and fsync every file (the old one is untouched);
#   2. rename .ckpt-tmp -> .ckpt-ready: ONE atomic rename is the commit point;
#   3. move the files of .ckpt-ready into OUT one by one, then remove .ckpt-ready.
# A crash before 2 leaves the old checkpoint intact (the partial .ckpt-tmp is ignored and deleted);
# a crash during 3 leaves a mix in OUT that recover() completes (roll forward) before anything loads
# it: load(), load_state() and save() all call it. So whatever loads is one whole checkpoint.

TMP, READY = ".ckpt-tmp", ".ckpt-ready"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(out_dir):
    """Finish a checkpoint swap that a crash interrupted (step 3 above), and drop an incomplete one."""
    shutil.rmtree(os.path.join(out_dir, TMP), ignore_errors=True)
    ready = os.path.join(out_dir, READY)
    if not os.path.isdir(ready):
        return
    # trainer_state last: until it moves, the old state never claims weights newer than itself
    for name in sorted(os.listdir(ready), key=lambda n: n == "trainer_state"):
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)   # the old copy; the new one is still in .ckpt-ready if we crash here
        os.replace(os.path.join(ready, name), dst)
    _fsync(out_dir)
    os.rmdir(ready)


def save(model, tok, out_dir, state=None, weights=None):
    """Write a checkpoint to out_dir atomically (see above). Logs and other files in out_dir are kept.
    weights: the full state dict when the model itself holds only shards (--fsdp, dist.model_state)."""
    os.makedirs(out_dir, exist_ok=True)
    recover(out_dir)
    tmp = os.path.join(out_dir, TMP)
    try:
        unwrapped = getattr(model, "module", model)  # DDP wraps the model
        unwrapped.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        tok.save_pretrained(tmp)
        if state is not None:
            os.makedirs(os.path.join(tmp, "trainer_state"))
            torch.save(state, os.path.join(tmp, "trainer_state", "state.pt"))
        write_checksums(tmp)
        for root, _, files in os.walk(tmp):   # on disk before the commit, not just in the page cache
            for f in files:
                _fsync(os.path.join(root, f))
            _fsync(root)
    except (OSError, RuntimeError) as e:      # torch.save reports a full disk as "unexpected pos ..."
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(out_dir).free < 64 << 20
        shutil.rmtree(tmp, ignore_errors=True)   # frees what it took; the last checkpoint was never touched
        raise OSError(f"{out_dir}: could not write the checkpoint" + (": the disk is full" if full else "") +
                      f" ({type(e).__name__}: {e}). The previous checkpoint there is intact.") from e
    os.replace(tmp, os.path.join(out_dir, READY))   # the commit point
    _fsync(out_dir)
    recover(out_dir)


# Each checkpoint lists the sha256 of its files in checksums.json, so that bit damage on disk (a bad
# sector, a partial copy) is refused at load instead of training on quietly. load() checks the model
# files, load_state() the training state. A directory without the list (any HF model) is not checked.
CHECKSUMS = "checksums.json"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(ckpt_dir):
    sums = {os.path.relpath(os.path.join(root, f), ckpt_dir): _sha256(os.path.join(root, f))
            for root, _, files in os.walk(ckpt_dir) for f in files}
    with open(os.path.join(ckpt_dir, CHECKSUMS), "w") as f:
        json.dump(sums, f, indent=1, sort_keys=True)


def verify_checksums(ckpt_dir, state):
    """Check the files of the checkpoint in ckpt_dir against its checksums.json: those under
    trainer_state/ (state=True) or the others (the model and tokenizer files)."""
    path = os.path.join(ckpt_dir, CHECKSUMS)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        sums = json.load(f)
    for name, want in sums.items():
        if name.startswith("trainer_state" + os.sep) != state:
            continue
        file = os.path.join(ckpt_dir, name)
        if not os.path.isfile(file):
            raise OSError(f"{file}: missing from the checkpoint (listed in {path})")
        if _sha256(file) != want:
            raise OSError(f"{file}: damaged (its sha256 differs from the one saved with it in {path}); "
                          f"refusing to load it")


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_state(out_dir):
    recover(out_dir)
    path = os.path.join(out_dir, "trainer_state", "state.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: {out_dir} has no checkpoint yet (no {path}); run without --resume "
                                f"to start a run there")
    verify_checksums(out_dir, state=True)
    return torch.load(path, weights_only=False)




def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
