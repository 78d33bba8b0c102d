"""Spot checks: a client re-executes a fraction of its steps elsewhere and catches servers that lie.

A server can return wrong activations (broken hardware, a bad quantization, or on purpose) and nothing in
the protocol alone would notice. After a step, with probability `rate` (and at least once every
`max_gap` steps, so a lie is caught within a bounded number of steps), and when an answer ends, the
client checks every hop:

1. It fetches each hop's history exactly (`HistoryRequest(exact=True)`) and checks it against the hop's
   signed commitments (`net/commitments.py`): a hop whose history is not what it signed for is caught by
   its own signature. The histories are then what was really sent, and hop i's input is hop i-1's history.
2. It feeds each hop's inputs since the last check to that hop's shadow (`net/shadows.py`): a cached
   session on an independent server holding those blocks (not in the chain, not banned), or the client's
   own blocks. Every position is compared once, at the first check after it was computed, so a lie told
   at any step is seen, and all checks together cost about one prefill on other servers.
3. It compares per position, within a tolerance set by both sides' dtype and quantization (`tolerance`).
4. On a mismatch a referee decides: a third server, or the client's own blocks, re-running the whole
   history statelessly. The side the referee disagrees with is the liar: banned for this client for good,
   logged with its evidence, recorded for `mesh status`. With no referee the hop is routed around (not
   convicted: nobody could tell which side lied).
5. The caller rebuilds the route without the liar and rewinds to the first bad position (`Rewind`), so
   generation continues from honest caches and the final tokens equal an honest run's.

Training passes have no caches: `judge_call` re-runs one hop's forward or backward statelessly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import torch
import trio

from ..model.errors import BadRequest, MeshError
from ..model.span import Span
from .announce import ServerInfo, ServerState
from .commitments import Commitment
from .messages import History
from .shadows import Shadow
from .steplog import concat_steps
from .wire import short_id

__all__ = ["DEFAULT_VERIFY", "ENV_VERIFY", "COMPRESSION_ERROR", "QUANT_ERROR", "check_rate", "verify_rate",
           "SpotChecker", "StepRecord",
           "Verdict", "spot_check", "check_commitments", "tolerance", "relative_errors", "caught_path",
           "read_caught"]

log = logging.getLogger("mesh.verify")

# one position's relative L2 error after 10 blocks vs float32: the largest over SmolLM2's three thirds and
# four texts (printed by `bench/verify.py --tolerances`; medians are about a third of these)
QUANT_ERROR = {("none", "float32"): 0.0, ("none", "bfloat16"): 0.1, ("none", "float16"): 0.1,
               ("int8", "float32"): 0.12, ("nf4", "float32"): 0.45}
SAME_KIND = {"float32": 1e-3, "bfloat16": 0.15, "float16": 0.15}  # two servers of one kind: rounding only
LOCAL = ("none", "float32")  # the client's own blocks
MARGIN = 1.5  # over the largest error seen
COMPRESSION_ERROR = {"none": 0.0, "float16": 1e-3, "bfloat16": 8e-3, "int8": 2e-2}  # relative, of the wire codec
DEFAULT_VERIFY = 0.02  # clients of the open swarm check 2% of their steps (and each answer as a whole)


ENV_VERIFY = "MESH_VERIFY"


def check_rate(rate: float) -> float:
    """A spot-check rate from a user: a fraction of steps in [0, 1]."""
    if not 0.0 <= rate <= 1.0:
        raise BadRequest(f"--verify {rate}: expected a fraction of steps between 0 and 1")
    return float(rate)


def verify_rate(rate: float | None, private: bool) -> float:
    """The rate a client uses: its own, else $MESH_VERIFY, else DEFAULT_VERIFY on the open swarm and 0 in
    a private one (whose members are known)."""
    if rate is None and os.environ.get(ENV_VERIFY):
        try:
            rate = float(os.environ[ENV_VERIFY])
        except ValueError:
            raise BadRequest(f"${ENV_VERIFY}={os.environ[ENV_VERIFY]!r}: expected a fraction of steps") from None
    if rate is None:
        return 0.0 if private else DEFAULT_VERIFY
    return check_rate(rate)


def _kind(info: ServerInfo | None) -> tuple[str, str]:
    return LOCAL if info is None else (info.quant, info.dtype)


def tolerance(a: ServerInfo | None, b: ServerInfo | None, blocks: int) -> float:
    """How far (relative L2, per position) two honest executions of `blocks` blocks may differ; None: the
    client's own fp32 blocks. Same kind: rounding; else each side's quantization error, with margin."""
    ka, kb = _kind(a), _kind(b)
    if ka == kb:
        return SAME_KIND.get(ka[1], 5e-2)
    noise = QUANT_ERROR.get(ka, 0.2) + QUANT_ERROR.get(kb, 0.2)
    return SAME_KIND["float32"] + MARGIN * noise * math.sqrt(max(1.0, blocks / 10))


def relative_errors(claimed: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per position [T]: the largest over the batch of ||claimed − reference|| / ||reference|| (padding 0)."""
    diff = (claimed.float() - reference.float()).norm(dim=-1)
    err = diff / reference.float().norm(dim=-1).clamp_min(1e-6)
    return (err * (mask != 0)).amax(dim=0)


@dataclass
class StepRecord:
    """A step's place and the commitments that came back with it: (peer id, session id, commitment) per hop."""

    position: int
    tokens: int
    signed: list[tuple[str, str, Commitment]]


@dataclass
class Verdict:
    """What one hop's check found: the first bad position (None: honest) and its evidence."""

    peer_id: str
    first_bad: int | None = None
    evidence: str = ""
    proven: bool = False  # caught by its own signature or by a referee


Execute = Callable[[ServerInfo | None, int, int, History], Awaitable[torch.Tensor]]
OpenShadow = Callable[[ServerInfo | None, int, int], Awaitable[Shadow]]
Run = Callable[[ServerInfo | None], Awaitable[torch.Tensor]]  # one computation, on a holder (None: local)


@dataclass
class SpotChecker:
    """When to check (rate, bounded gap), and how to judge one hop: a shadow (`open_shadow(server or None
    for local, start, end)`) re-runs the hop's new positions; `execute(…, inputs)` re-runs a whole history
    statelessly (referees); `servers()` lists the swarm's servers of this model. Owns its shadows."""

    rate: float
    servers: Callable[[], list[ServerInfo]]
    execute: Execute
    open_shadow: OpenShadow | None = None
    local: Span | None = None
    rng: random.Random = field(default_factory=random.Random)
    wire_error: float = 0.0  # the chain's compression error, forgiven on top of `tolerance`
    record_to: Path | None = None  # where caught servers are recorded for `mesh status`
    banish: Callable[[str], None] | None = None  # bans a convicted peer for the client (BanList.convict)
    checks: int = 0  # positions compared, summed over hops (training: passes compared)
    unchecked: int = 0  # steps since the last check
    verified_to: int = 0  # positions [0, verified_to) of the current chain were checked
    floor: int = 0  # the lowest position fed again while a check ran (it is not checked by that one)
    incomplete: bool = False  # a shadow failed during the current check
    caught: dict[str, str] = field(default_factory=dict)  # peer id -> evidence
    shadows: dict[tuple[int, int], Shadow] = field(default_factory=dict)

    async def aclose(self) -> None:
        shadows, self.shadows = list(self.shadows.values()), {}
        for shadow in shadows:
            await shadow.aclose()

    @property
    def max_gap(self) -> int:
        return max(1, math.ceil(2 / self.rate)) if self.rate > 0 else 0

    def due(self) -> bool:
        """Whether the step just taken is checked: with probability `rate`, and after `max_gap` unchecked."""
        if self.rate <= 0:
            return False
        self.unchecked += 1
        if self.unchecked >= self.max_gap or self.rng.random() < self.rate:
            self.unchecked = 0
            return True
        return False

    def _holders(self, start: int, end: int, exclude: set[str], banned: frozenset[str],
                 like: ServerInfo | None = None, local: bool = True) -> list[ServerInfo | None]:
        """Who can re-execute blocks [start, end): independent servers in random order, those of the same
        dtype and quantization as `like` first (their tolerance is tight), then local blocks."""
        out: list[ServerInfo | None] = [s for s in self.servers() if s.start <= start and end <= s.end
                                        and s.state == ServerState.ONLINE and s.peer_id not in exclude
                                        and s.peer_id not in banned]
        self.rng.shuffle(out)
        out.sort(key=lambda s: _kind(s) != _kind(like))
        if local and self.local is not None and self.local.start <= start and end <= self.local.end:
            out.append(None)
        return out

    async def judge(self, info: ServerInfo, start: int, end: int, inputs: History, claimed: torch.Tensor,
                    since: int, banned: frozenset[str]) -> Verdict:
        """Check one hop's claimed outputs for positions [since, T) of `inputs` ([0, T)) on its shadow; a
        mismatch goes to a referee, which re-runs the whole history."""
        verdict = Verdict(info.peer_id)
        total = inputs.hidden.shape[1]
        if since >= total:  # nothing new since the last check
            return verdict
        shadow = await self._shadow(start, end, {info.peer_id}, banned, info)
        if shadow is None:
            log.info("cannot check blocks %d:%d of %s: no independent server holds them", start, end,
                     short_id(info.peer_id))
            return verdict
        a = min(shadow.fed, since)
        try:
            reference = await shadow.run(a, inputs.hidden[:, a:], inputs.position_ids[:, a:],
                                         inputs.attention_mask[:, a:])
        except (MeshError, trio.TooSlowError) as e:
            log.info("checker %s failed: %s", _name(shadow.holder), e)
            await self._drop(start, end)
            self.incomplete = True  # these positions are compared at the next check, on another shadow
            return verdict
        self.checks += total - since
        window = slice(since, total)
        mask = inputs.attention_mask[:, window]
        errors = relative_errors(claimed[:, window], reference[:, since - a:], mask)
        checker = shadow.holder
        tol = tolerance(info, checker, end - start) + self.wire_error
        if not bool((errors > tol).any()):
            return verdict
        return await self._settle(info, start, end, claimed[:, window], mask, checker, errors, tol, since,
                                  lambda h: self.execute(h, start, end, inputs), banned)

    async def _shadow(self, start: int, end: int, exclude: set[str], banned: frozenset[str],
                      like: ServerInfo) -> Shadow | None:
        """The shadow of blocks [start, end), opened on the first independent holder that takes it."""
        shadow = self.shadows.get((start, end))
        if shadow is not None and shadow.holder is not None and (
                shadow.holder.peer_id in exclude or shadow.holder.peer_id in banned):
            await self._drop(start, end)  # its server joined the chain, or was banned
            shadow = None
        if shadow is None and self.open_shadow is not None:
            for holder in self._holders(start, end, exclude, banned, like):
                try:
                    shadow = self.shadows[(start, end)] = await self.open_shadow(holder, start, end)
                    break
                except (MeshError, trio.TooSlowError) as e:
                    log.info("cannot open a checker on %s: %s", _name(holder), e)
        return shadow

    async def _drop(self, start: int, end: int) -> None:
        shadow = self.shadows.pop((start, end), None)
        if shadow is not None:
            await shadow.aclose()

    async def judge_call(self, info: ServerInfo, start: int, end: int, claimed: torch.Tensor, mask: torch.Tensor,
                         banned: frozenset[str], run: Run) -> Verdict:
        """Check what `info` answered for blocks [start, end) (`claimed`, [B, T, H]) against `run` on an
        independent holder, a referee deciding a mismatch."""
        checker, reference = await self._run_somewhere(start, end, run, {info.peer_id}, banned, info)
        if reference is None:
            log.info("cannot check blocks %d:%d of %s: no independent server holds them", start, end,
                     short_id(info.peer_id))
            return Verdict(info.peer_id)
        self.checks += 1
        errors = relative_errors(claimed, reference, mask)
        tol = tolerance(info, checker, end - start) + self.wire_error
        if not bool((errors > tol).any()):
            return Verdict(info.peer_id)
        return await self._settle(info, start, end, claimed, mask, checker, errors, tol, 0, run, banned)

    async def _settle(self, info: ServerInfo, start: int, end: int, claimed: torch.Tensor, mask: torch.Tensor,
                      checker: ServerInfo | None, errors: torch.Tensor, tol: float, offset: int, run: Run,
                      banned: frozenset[str]) -> Verdict:
        """`claimed` (positions offset, offset + 1, … of the hop's output) differs from `checker`'s by
        `errors` > `tol` somewhere: a referee re-runs `run` (every position from 0) and decides who lied."""
        verdict = Verdict(info.peer_id)
        i = int((errors > tol).nonzero()[0])
        first = offset + i
        exclude = {info.peer_id} | ({checker.peer_id} if checker is not None else set())
        referee, third = await self._run_somewhere(start, end, run, exclude, banned, info,
                                                   local=checker is not None)
        by = _name(checker)
        if third is None:
            verdict.first_bad = first
            verdict.evidence = (f"blocks {start}:{end} differ from {by}'s at position {first} (relative error "
                                f"{errors[i]:.3g} > {tol:.3g}); no referee")
            return verdict
        to_hop = relative_errors(claimed, third[:, offset:], mask)
        if bool((to_hop > tolerance(info, referee, end - start) + self.wire_error).any()):
            verdict.first_bad, verdict.proven = first, True
            verdict.evidence = (f"blocks {start}:{end} at position {first}: relative error {errors[i]:.3g} "
                                f"(tolerance {tol:.3g}) against {by}; referee {_name(referee)} agrees with {by}")
        elif checker is not None:  # the referee sides with the hop: the checker lied
            log.warning("checker %s disagreed with %s on blocks %d:%d, referee %s sided with the hop",
                        short_id(checker.peer_id), short_id(info.peer_id), start, end, _name(referee))
            self.convict(checker.peer_id, f"re-executed blocks {start}:{end} wrongly (referee {_name(referee)})")
            shadow = self.shadows.get((start, end))
            if shadow is not None and shadow.holder is checker:
                await self._drop(start, end)
        return verdict

    async def _run_somewhere(self, start: int, end: int, run: Run, exclude: set[str], banned: frozenset[str],
                             like: ServerInfo, local: bool = True) -> tuple[ServerInfo | None, torch.Tensor | None]:
        """Run on the first holder of [start, end) that answers (`local`: the client's own blocks may be
        it); (None, None) when none can."""
        for holder in self._holders(start, end, exclude, banned, like, local):
            try:
                return holder, await run(holder)
            except (MeshError, trio.TooSlowError) as e:
                log.info("checker %s failed: %s", _name(holder), e)
        return None, None

    def convict(self, peer_id: str, evidence: str) -> None:
        """Record a liar with its evidence (log, and the file `mesh status` reads)."""
        self.caught[peer_id] = evidence
        if self.banish is not None:
            self.banish(peer_id)
        log.warning("server %s caught: %s; banned for this client", short_id(peer_id), evidence)
        if self.record_to is not None:
            record_caught(self.record_to, peer_id, evidence)


async def spot_check(session, end: int) -> dict[str, Verdict]:
    """Check each hop of an inference session (`net/inference.py`) for positions [0, end); the servers
    found lying (by peer id), each with its verdict. Hops whose history cannot be had are left to failover.
    The session may go on stepping meanwhile: this works on what the hops and inputs were at the start,
    and a step that rolls back below `end` lowers `checker.floor`, so what it fed again is checked again."""
    checker: SpotChecker = session.cfg.checker
    checker.floor, checker.incomplete = end, False
    hops, records = list(session.hops), list(session.records)
    histories: list[History | None] = [None] * len(hops)
    batch = session.cfg.batch_size
    hidden = session.inputs[0].hidden.shape[2] if session.inputs else 0
    first_inputs = concat_steps(session.inputs, end, batch, hidden)

    async def fetch(i: int) -> None:
        try:
            histories[i] = await hops[i].history(end, exact=True)
        except (MeshError, trio.TooSlowError) as e:
            log.info("spot check: no history from %s: %s", short_id(hops[i].hop.peer_id), e)

    async with trio.open_nursery() as nursery:
        for i in range(len(hops)):
            nursery.start_soon(fetch, i)
    verdicts: dict[int, Verdict] = {}
    since = min(checker.verified_to, end)
    for i, (link, history) in enumerate(zip(hops, histories)):
        if history is None or history.hidden.shape[1] != end:
            continue
        first = check_commitments(history.hidden, link.hop.peer_id, link.session.session_id, records, since)
        if first is not None:
            verdicts[i] = Verdict(link.hop.peer_id, first, f"its history differs from its signed commitment "
                                                            f"at position {first}", proven=True)
    banned = session.cfg.bans.banned() | {h.hop.peer_id for h in hops}

    async def judge(i: int) -> None:
        inputs = first_inputs if i == 0 else histories[i - 1]
        if inputs is None or inputs.hidden.shape[1] != end or i in verdicts or (i - 1) in verdicts \
                or histories[i] is None or histories[i].hidden.shape[1] != end:
            return
        link = hops[i]
        verdict = await checker.judge(link.info, link.hop.start, link.hop.end, inputs, histories[i].hidden,
                                      since, banned)
        if verdict.first_bad is not None:
            verdicts[i] = verdict

    async with trio.open_nursery() as nursery:
        for i in range(len(hops)):
            nursery.start_soon(judge, i)
    if all(h is not None for h in histories) and not checker.incomplete:  # else all again from `since`
        checker.verified_to = min([end, checker.floor] + [v.first_bad for v in verdicts.values()])
    return {hops[i].hop.peer_id: v for i, v in verdicts.items()}


def _name(info: ServerInfo | None) -> str:
    return "the client's own blocks" if info is None else short_id(info.peer_id)


def check_commitments(history: torch.Tensor, peer_id: str, session_id: str, records: list[StepRecord],
                      since: int = 0) -> int | None:
    """The first position where a hop's history differs from what it signed (None: it matches); steps
    that end before `since` were checked before."""
    for record in records:
        if record.position + record.tokens <= since:
            continue
        for peer, session, commitment in record.signed:
            if (peer, session) != (peer_id, session_id):
                continue
            end = record.position + record.tokens
            if end > history.shape[1] or not commitment.signed_by(peer_id, session_id) \
                    or commitment.position != record.position \
                    or not commitment.matches(history[:, record.position:end]):
                return record.position
    return None


def caught_path() -> Path:
    """Where this user's clients record the servers they caught ($MESH_HOME or ~/.config/mesh)."""
    home = Path(os.environ.get("MESH_HOME", Path.home() / ".config" / "mesh"))
    return home / "caught.json"


def record_caught(path: Path, peer_id: str, evidence: str) -> None:
    try:
        data = read_caught(path)
        data[peer_id] = {"time": time.time(), "evidence": evidence[:500]}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot record caught server in %s: %s", path, e)


def read_caught(path: Path) -> dict[str, dict]:
    """Servers this user's clients caught: peer id -> {time, evidence}; empty when none or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)} \
        if isinstance(data, dict) else {}
