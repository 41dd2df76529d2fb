"""Before a model's features leave the device: verify its attestations, check the
participant's policy, ask for consent.

    1. attestations: each envelope is checked (protocol.attestation.verify) against the
       participant's trust store (client.auditors) and must bind the served card (every
       field) and the sha256 of the model files on disk, the very bytes the client runs
       (check_binds). At least one must pass; envelopes that do not are ignored.
    2. ambiguation floor (sparse_code models): the attested card's fakes per map must be
       at least max(2·k, MIN_K_FAKE), the client's own minimum; max(k, MIN_K_FAKE) for a card
       whose fakes are whole decoy codes with public magnitudes (sparse.magnitudes "key").
    3. policy (<home>/policy.json, never looser than POLICY_DEFAULTS): every valid
       attestation's measured figures must pass it.
    4. consent: a summary of what the model keeps and hides, who audited it and when; the
       answer is remembered per model id, model sha256 and card (<home>/consent.json).

A failure in 1 is AttestationError (exit 4); in 2-4 PolicyRefusedError (exit 13).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from client.auditors import TrustStore
from client.home import Home, write_private
from protocol.attestation import (
    AttestationError,
    Verified,
    attested_card,
    check_binds,
    model_files,
    save_envelope,
    verify,
)
from protocol.errors import InvalidInputError, PricError
from protocol.model_card import ModelCard, sha256_file

EXIT_POLICY = 13
# the client's own floor under ambiguation: fakes per code map at least max(2·k, MIN_K_FAKE).
# With whole decoy codes and public magnitudes (sparse.magnitudes "key") one decoy code per
# true code: the audit's learned attacker did worse against that (k' = 2k) than against 9
# uniform fakes per true value (docs/results-sparse.md)
MIN_K_FAKE = 16
MIN_FAKE_RATIO = 2
MIN_FAKE_RATIO_DECOY_CODES = 1


class PolicyRefusedError(PricError):
    """The model fails the participant's policy or the client's ambiguation floor, or the
    participant did not consent (exit 13; nothing is uploaded)."""

    code = "policy_refused"
    exit_code = EXIT_POLICY


# --- policy ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """Upper bounds on what an attested model may leak. Each may only be lowered."""

    private_margin: float = 0.12     # strongest attacker's accuracy ≤ chance + this
    max_psnr: float = 20.0           # reconstruction PSNR (dB) ≤ this
    max_reid_rank1: float = 0.05     # re-identification rank-1 ≤ this
    per_person_margin: float = 0.25  # pooled accuracy over your photos ≤ chance + this

    @classmethod
    def load(cls, home: Home) -> Policy:
        """The participant's policy; a value looser than the default is read as the default
        (the file cannot loosen it), a damaged file is refused in one line."""
        path = home.policy_path
        if not path.exists():
            return cls()
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise ValueError
        except (OSError, ValueError):
            raise InvalidInputError(f"{path}: not a readable policy (JSON object); fix or delete it") from None
        defaults = cls()
        kw = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise InvalidInputError(f"{path}: {f.name} must be a number ≥ 0, not {str(v)[:40]!r}")
                kw[f.name] = min(float(v), getattr(defaults, f.name))
        return cls(**kw)

    def save(self, home: Home) -> Path:
        home.ensure()
        write_private(home.policy_path, (json.dumps(asdict(self), indent=2) + "\n").encode())
        return home.policy_path

    def tightened(self, key: str, text: str) -> Policy:
        """This policy with `key` set to `text`, refusing anything looser than now."""
        names = [f.name for f in fields(self)]
        if key not in names:
            raise InvalidInputError(f"policy set {key}: no such setting (one of {', '.join(names)})")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise InvalidInputError(f"policy set {key} {text}: must be a number ≥ 0")
        current = getattr(self, key)
        if value > current:
            raise PolicyRefusedError(f"policy set {key} {text}: looser than the current {current:g}; "
                                     "the policy can only be tightened (`policy reset` returns to the defaults)")
        return replace(self, **{key: value})


POLICY_HELP = {
    "private_margin": "the private attribute: the strongest attacker's accuracy at most chance "
                      "(max of majority rate and label floor) plus this",
    "max_psnr": "reconstruction from what is uploaded: PSNR at most this many dB",
    "max_reid_rank1": "re-identification: rank-1 accuracy at most this (a measurement is required)",
    "per_person_margin": "an attacker pooling your photos (when the audit measured it): accuracy at the "
                         "number of your photos the collector would hold (those already sent included) at "
                         "most chance plus this",
}


def _num(d: Mapping[str, Any], key: str, what: str) -> float:
    v = d.get(key) if isinstance(d, Mapping) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PolicyRefusedError(f"{what}: the attestation does not state {key}")
    return float(v)


def chance(measured: Mapping[str, Any], what: str) -> float:
    private = measured.get("private")
    return max(_num(private, "majority_rate", what), _num(private, "label_floor", what)
               if isinstance(private, Mapping) and "label_floor" in private else 0.0)


def per_person_at(measured: Mapping[str, Any], photos: int, what: str) -> tuple[int, float] | None:
    """(listed count, pooled accuracy) at `photos`: the nearest listed count at or above
    it, else the largest. None when the audit did not measure it."""
    pp = measured.get("per_person")
    if pp is None:
        return None
    counts, accs = (pp.get("photos"), pp.get("accuracy")) if isinstance(pp, Mapping) else (None, None)
    if not isinstance(counts, list) or not isinstance(accs, list) or not counts or len(counts) != len(accs) or \
            not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts) or \
            not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in accs):
        raise PolicyRefusedError(f"{what}: the attestation's per_person figures are malformed")
    pairs = sorted(zip(counts, accs))
    for n, acc in pairs:
        if n >= photos:
            return n, float(acc)
    return pairs[-1][0], float(pairs[-1][1])


def check_policy(policy: Policy, measured: Mapping[str, Any], photos: int, what: str) -> None:
    """Raise PolicyRefusedError naming the first figure above the participant's bound."""
    private = measured.get("private")
    if not isinstance(private, Mapping):
        raise PolicyRefusedError(f"{what}: the attestation measures no private attribute")
    floor = chance(measured, what)
    acc = _num(private, "strongest_accuracy", what)
    attr = str(private.get("attribute", "private attribute"))[:60]
    if acc > floor + policy.private_margin:
        raise PolicyRefusedError(f"{what}: {attr} is guessed right {acc:.3f} of the time by the strongest attacker, "
                                 f"above your bound {floor + policy.private_margin:.3f} (chance {floor:.3f} + "
                                 f"private_margin {policy.private_margin:g})")
    psnr = _num(measured.get("reconstruction") or {}, "psnr", what)
    if psnr > policy.max_psnr:
        raise PolicyRefusedError(f"{what}: reconstruction PSNR {psnr:.1f} dB is above your bound max_psnr "
                                 f"{policy.max_psnr:g} dB")
    reid = measured.get("reid") or {}
    if not isinstance(reid, Mapping) or reid.get("rank1") is None:
        raise PolicyRefusedError(f"{what}: re-identification was not measured (reid.rank1 is null); your policy "
                                 f"needs rank-1 ≤ {policy.max_reid_rank1:g}")
    r1 = _num(reid, "rank1", what)
    if r1 > policy.max_reid_rank1:
        raise PolicyRefusedError(f"{what}: re-identification rank-1 {r1:.3f} is above your bound max_reid_rank1 "
                                 f"{policy.max_reid_rank1:g}")
    got = per_person_at(measured, photos, what)
    if got is not None and got[1] > floor + policy.per_person_margin:
        raise PolicyRefusedError(f"{what}: pooling {got[0]} photos of one person, an attacker guesses {attr} right "
                                 f"{got[1]:.3f} of the time, above your bound {floor + policy.per_person_margin:.3f} "
                                 f"for {photos} photos of yours at this collector, those already sent included (chance {floor:.3f} + "
                                 f"per_person_margin {policy.per_person_margin:g}); send fewer photos, or use a model "
                                 "whose attestation passes (see `pric-client policy show`)")


def check_ambiguation_floor(card: ModelCard) -> None:
    """A sparse_code card must ask for at least the client's own minimum of fakes."""
    if card.kind != "sparse_code" or card.sparse is None:
        return
    sp = card.sparse
    ratio = MIN_FAKE_RATIO_DECOY_CODES if sp.magnitudes == "key" else MIN_FAKE_RATIO
    need = max(ratio * sp.k, MIN_K_FAKE)
    if sp.k_fake < need:
        raise PolicyRefusedError(f"model {card.model_id}: its card asks for k_fake={sp.k_fake} fake values per code "
                                 f"map with k={sp.k} true ones; this client never adds fewer than "
                                 f"max({ratio}·k, {MIN_K_FAKE}) = {need}")


# --- consent ---------------------------------------------------------------------------
def card_digest(card: ModelCard) -> str:
    return hashlib.sha256(json.dumps(attested_card(card), sort_keys=True).encode()).hexdigest()


class Consents:
    """<home>/consent.json (mode 0600): model id → what was agreed to."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.path = home.consent_path

    def _load(self) -> dict[str, Any]:
        try:
            d = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            raise InvalidInputError(f"{self.path}: not readable consent records (JSON); delete it to be asked "
                                    "again") from None
        return d if isinstance(d, dict) else {}

    def has(self, card: ModelCard) -> bool:
        got = self._load().get(card.model_id)
        return isinstance(got, dict) and got.get("sha256") == card.sha256 and got.get("card") == card_digest(card)

    def record(self, card: ModelCard, auditors: Sequence[str]) -> None:
        d = self._load()
        d[card.model_id] = {"sha256": card.sha256, "card": card_digest(card), "auditors": list(auditors),
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.home.ensure()
        write_private(self.path, (json.dumps(d, indent=2, sort_keys=True) + "\n").encode())


# --- the whole check -------------------------------------------------------------------
def verified_attestations(card: ModelCard, model_dir: Path, envelopes: Sequence[Any],
                          trusted: Mapping[str, Any]) -> list[tuple[Verified, Any]]:
    """(attestation, its envelope) of every envelope signed by a trusted key that binds
    this card and the files on disk. Raises AttestationError with the reason when there is
    none."""
    if not trusted:
        raise AttestationError(f"model {card.model_id}: your trust store holds no auditor key, so no attestation "
                               "can be checked; add one with `pric-client trust add FILE`")
    if not envelopes:
        raise AttestationError(f"model {card.model_id}: no signed audit attestation is served for it; refusing "
                               "to use it")
    files = {name: sha256_file(Path(model_dir) / name) for name in model_files(card)}
    good: list[tuple[Verified, Any]] = []
    reasons: list[str] = []
    for env in envelopes:
        try:
            v = verify(env, trusted)
            check_binds(v, card, files)
        except AttestationError as exc:
            reasons.append(exc.message)
            continue
        if v.predicate.get("model_id") != card.model_id:
            reasons.append(f"attestation by {v.key.name or v.key.keyid[:16]} is for model "
                           f"{str(v.predicate.get('model_id'))[:80]}, not {card.model_id}")
            continue
        good.append((v, env))
    if not good:
        more = f" (and {len(reasons) - 1} other attestation(s) failed too)" if len(reasons) > 1 else ""
        raise AttestationError(f"model {card.model_id}: no valid attestation: {reasons[0]}{more}")
    return good


def summary(card: ModelCard, good: Sequence[Verified], policy: Policy, photos: int) -> list[str]:
    """What the participant is shown before consenting: one line each."""
    lines = [f"Model {card.model_id} ({card.kind}, sha256 {card.sha256[:16]}…)"]
    for v in good:
        p = v.predicate
        m = p["measured"]
        data = p.get("data") or {}
        lines.append(f"Audited by {v.key.name or '(unnamed)'} (key {v.key.keyid[:16]}) on {str(p.get('date'))[:10]}, "
                     f"on {str(data.get('name', '?'))[:40]} ({str(data.get('split', '?'))[:20]} split, "
                     f"{data.get('n_test', '?')} photos):")
        primary = m.get("primary") or {}
        kept = ", ".join(f"{str(name)[:40]} {_f((v2 or {}).get('accuracy'))}" for name, v2 in
                         list(primary.items())[:20]) if isinstance(primary, Mapping) else ""
        lines.append(f"  keeps: {kept or '(no primary task measured)'} (accuracy)")
        pr = m["private"]
        ci = pr.get("ci95") if isinstance(pr.get("ci95"), list) and len(pr.get("ci95")) == 2 else ["?", "?"]
        floor = chance(m, card.model_id)
        lines.append(f"  hides: {str(pr.get('attribute', '?'))[:60]}: the strongest attacker "
                     f"({str(pr.get('strongest', '?'))[:30]}) is right {_f(pr.get('strongest_accuracy'))} of the "
                     f"time (95% interval {_f(ci[0])}–{_f(ci[1])}); chance is {floor:.3f} (majority rate "
                     f"{_f(pr.get('majority_rate'))}, label floor {_f(pr.get('label_floor'))}); "
                     f"your bound {floor + policy.private_margin:.3f}")
        rec = m.get("reconstruction") or {}
        lines.append(f"  reconstruction from what is uploaded: PSNR {_f(rec.get('psnr'), 1)} dB "
                     f"(your bound {policy.max_psnr:g} dB)")
        reid = m.get("reid") or {}
        lines.append(f"  re-identification: rank-1 {_f(reid.get('rank1'))} (chance {_f(reid.get('chance_rank1'))}; "
                     f"your bound {policy.max_reid_rank1:g})")
        pp = per_person_at(m, photos, card.model_id)
        if pp is not None:
            lines.append(f"  across your photos: pooling {pp[0]} photos of one person, an attacker is right "
                         f"{pp[1]:.3f} of the time (your bound {floor + policy.per_person_margin:.3f})")
    if card.kind == "sparse_code" and card.sparse is not None:
        lines.append(f"Each code map is sent with {card.sparse.k} true and {card.sparse.k_fake} fake values; "
                     "only holders of your keys can tell them apart.")
        if card.sparse.magnitudes == "key":
            lines.append("The fakes are whole decoy codes; every value is sent with a public magnitude, and the true "
                         "magnitudes stay in your keys.")
    lines.append("The signature proves that this auditor measured these figures on these exact model bytes and "
                 "this card; it does not prove the auditor honest, nor that the figures hold for photos unlike "
                 "the audited ones.")
    return lines


def _f(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def approve(home: Home, card: ModelCard, model_dir: Path, envelopes: Sequence[Any], *, photos: int,
            say: Callable[[str], None], ask: Callable[[str], bool | None], yes: bool, dry_run: bool = False,
            store: bool = True) -> list[Verified]:
    """The whole check before `card`'s model is used on `photos` photos. Raises
    AttestationError (exit 4) or PolicyRefusedError (exit 13); returns the valid
    attestations. `ask(question)`: True/False, or None without a terminal. `store`: keep
    the valid envelopes beside the cached model (for offline `transform`)."""
    pairs = verified_attestations(card, model_dir, envelopes, TrustStore(home).trusted())
    good = [v for v, _ in pairs]
    check_ambiguation_floor(card)
    policy = Policy.load(home)
    for v in good:
        data = v.predicate.get("data")
        if isinstance(data, Mapping) and data.get("quick"):
            raise PolicyRefusedError(f"model {card.model_id}: the attestation by {v.key.name or v.key.keyid[:16]} "
                                     "signs a smoke run (pric-audit --quick), not an audit; its figures come from "
                                     "weakened attackers on a subsample")
        check_policy(policy, v.predicate["measured"], photos,
                     f"model {card.model_id} (audited by {v.key.name or v.key.keyid[:16]})")
    if store:
        for _, env in pairs:
            save_envelope(model_dir, env)
    consents = Consents(home)
    if consents.has(card):
        return good
    for line in summary(card, good, policy, photos):
        say(line)
    if dry_run:
        say("(dry run: not asking for consent; a real upload will)")
        return good
    if not yes:
        answer = ask("Upload features of this model? [y/N] ")
        if answer is None:
            raise PolicyRefusedError(f"model {card.model_id}: no consent recorded and no terminal to ask; run once "
                                     "in a terminal, or pass --yes to consent to it")
        if not answer:
            raise PolicyRefusedError(f"model {card.model_id}: you did not consent; nothing was uploaded")
    consents.record(card, [v.key.keyid for v in good])
    return good

