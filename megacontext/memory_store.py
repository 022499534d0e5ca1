"""
A persistent memory on disk: what MCSession saves beside its tree so that MCSession.open continues
exactly where it stopped.

    memory_dir/tree/          the MCTree's files (megacontext/tree.py)
    memory_dir/session.json   the working context's entries, the allocator's cooldown state, counters,
                              the blocks focus opened (`kept`), the MCConfig, the fingerprints of the
                              GPT / GistNet / LensNet that made it, and the checkpoint they came from

`read_saved` checks everything that can be checked without the nets (the file's version and fields, the
identity of the nets, the config fields that shape the memory) and says what is wrong in one line.
"""
import dataclasses
import hashlib
import json
import logging
import os
from typing import NamedTuple

import numpy as np

from nanochat.checkpoint_manager import atomic_write
from nanochat.common import UserError
from megacontext.allocator import CooldownState
from megacontext.config import MCConfig
from megacontext.working_context import WCError, WorkingContext, check_invariants

logger = logging.getLogger("nanochat")

SESSION_FILE = "session.json"
SESSION_VERSION = 1
MEMORY_SHAPING = ("block_size", "max_level", "storage_dtype", "positions")  # must match the model's config


class SessionError(UserError, ValueError):
    """A bad input to a session, or a memory directory that cannot be used."""


class Saved(NamedTuple):
    """What session.json restores (the tree is opened by the session itself)."""
    wc: WorkingContext
    cooldown: CooldownState
    refocus_count: int
    since_refocus: int
    edit_count: int
    kept: list


def module_fingerprint(module):
    """A short, dtype/device independent hash of a module's weights (a strided sample of each tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        shape = tuple(t.shape)
        t = t.detach().reshape(-1)
        sample = t[::max(1, t.numel() // 4096)].float().cpu().contiguous()
        h.update(f"{name}:{shape}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def session_path(memory_dir):
    return os.path.join(memory_dir, SESSION_FILE)


def recorded_source(memory_dir):
    """The checkpoint source a saved memory recorded, or None (no memory there yet, or none recorded)."""
    try:
        with open(session_path(memory_dir), encoding="utf-8") as f:
            return (json.load(f).get("source") or {}).get("source")
    except (OSError, ValueError, AttributeError):
        return None  # read_state reports a corrupted memory with its own message


def read_state(memory_dir):
    """The raw session.json of a saved memory (a dict with every required field), or SessionError."""
    path = session_path(memory_dir)
    if not os.path.isfile(path):
        raise SessionError(f"{memory_dir}: no {SESSION_FILE}, not a saved MegaContext memory")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get("version") != SESSION_VERSION:
            raise ValueError(f"unknown version {state.get('version') if isinstance(state, dict) else state!r}")
        for key in ("identity", "mc_config", "wc", "cooldown", "refocus_count", "since_refocus"):
            if key not in state:
                raise ValueError(f"missing {key!r}")
    except (OSError, ValueError) as e:
        raise SessionError(f"{path} is corrupted ({e}); the memory cannot be restored") from None
    return state


def read_saved(memory_dir, identity, cfg):
    """
    Saved state of memory_dir, checked against the nets that will read it (`identity`: their fingerprints)
    and the model's MCConfig. A different GPT or GistNet is an error (the tree's gists would be another
    model's); another LensNet only a warning (it changes what is focused, not what is stored).
    """
    state = read_state(memory_dir)
    ident = state["identity"]
    for net in ("gpt", "gistnet"):
        if ident.get(net) != identity[net]:
            raise SessionError(f"memory {memory_dir} was made by a different model ({net} {ident.get(net)}, the "
                               f"current {net} is {identity[net]}): open it with the checkpoint that made it, "
                               f"or start a new memory")
    if ident.get("lensnet") != identity["lensnet"]:
        logger.warning(f"memory {memory_dir} was focused by another LensNet; continuing with the current one")
    try:
        known = {f.name for f in dataclasses.fields(MCConfig)}  # tolerate knobs added or removed since
        scfg = MCConfig.from_dict({k: v for k, v in state["mc_config"].items() if k in known})
        wc = WorkingContext(np.array(state["wc"]["levels"], np.int64), np.array(state["wc"]["indices"], np.int64),
                            int(state["wc"]["num_tokens"]))
        cd = state["cooldown"]
        cooldown = CooldownState(int(cd["pass_idx"]), tuple((str(o), int(l), int(i), int(p))
                                                             for o, l, i, p in cd["history"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SessionError(f"{session_path(memory_dir)} is corrupted ({e})") from None
    for f in MEMORY_SHAPING:
        if getattr(scfg, f) != getattr(cfg, f):
            raise SessionError(f"memory {memory_dir} was made with {f}={getattr(scfg, f)!r}, the model's config "
                               f"has {getattr(cfg, f)!r}")
    try:
        check_invariants(wc, cfg)
    except WCError as e:
        raise SessionError(f"memory {memory_dir} is corrupted: {e}") from None
    return Saved(wc, cooldown, int(state["refocus_count"]), int(state["since_refocus"]),
                 int(state.get("edit_count", 0)), [int(b) for b in state.get("kept", [])])  # older memories: no kept


def write_state(memory_dir, identity, source_info, cfg, saved):
    """Write session.json atomically (fsynced before the rename)."""
    state = {"version": SESSION_VERSION, "identity": identity, "source": source_info, "mc_config": cfg.to_dict(),
             "wc": {"levels": saved.wc.levels.tolist(), "indices": saved.wc.indices.tolist(),
                    "num_tokens": saved.wc.num_tokens},
             "cooldown": {"pass_idx": saved.cooldown.pass_idx, "history": [list(h) for h in saved.cooldown.history]},
             "refocus_count": saved.refocus_count, "since_refocus": saved.since_refocus,
             "edit_count": saved.edit_count, "kept": list(saved.kept)}

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(session_path(memory_dir), write)
