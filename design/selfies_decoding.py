"""Constrained decoding of SELFIES: the backbone may only write text that is a string of SELFIES symbols.

Why SELFIES (Krenn et al. 2020) and not grammar-constrained SMILES: every sequence of symbols of
the semantically robust alphabet decodes to a molecule that RDKit parses, so the constraint only
has to keep the *spelling* right (a regular language: ``[`` + symbol body + ``]``, repeated), which
a small automaton over token strings does exactly. Grammar-constrained SMILES must also close every
ring bond and branch and respect valences, which is context-sensitive: the mask then depends on
the whole prefix, and a grammar alone still lets through valence errors (``C(C)(C)(C)(C)C``).

The backbone's tokenizer is arbitrary (byte-level for tiny models, BPE for SmolLM2), and a BPE
token may span symbol boundaries (``][``) or hold half a symbol (``Bra``). So the automaton runs on
characters: its state is the unfinished symbol after the last ``]`` (``pending``) and whether a
first symbol is complete. A token is allowed when appending its text keeps every finished symbol
in the alphabet and the unfinished tail a prefix of one. The allowed token set depends only on the
state, so it is computed once per state and cached. End of sequence is allowed only between
symbols, after at least one; the first symbol must be an atom, so the molecule is never empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import selfies as sf
import torch
from torch import Tensor

__all__ = ["SelfiesConstraint", "decode_selfies", "default_alphabet", "encode_selfies", "split_symbols"]

# Symbols that only make sense after an atom (they refer back to one) or that decode to nothing.
_NOT_FIRST = ("[Branch", "[=Branch", "[#Branch", "[Ring", "[=Ring", "[#Ring", "[-Ring", "[/Ring", "[\\Ring")


def default_alphabet(extra: Iterable[str] = ()) -> list[str]:
    """SELFIES' semantically robust alphabet plus the ``extra`` symbols (e.g. those of a training
    set) that keep it robust.

    An extra atom symbol is kept only when SELFIES' semantic constraints know its element and
    charge (``[C@@H1]``, ``[N+1]``, ``[=S]``): for any other (``[In]``, ``[Se]``, ``[Si]``) the decoder
    allows up to 8 bonds, more than RDKit accepts, so a model could write a molecule RDKit refuses.
    ``[nop]`` (a padding symbol that decodes to nothing) is left out.
    """
    symbols = set(sf.get_semantic_robust_alphabet()) | {s for s in extra if _robust(s)}
    symbols.discard("[nop]")
    return sorted(symbols)


def _robust(symbol: str) -> bool:
    """True for branch and ring symbols, and for atom symbols whose bonding capacity SELFIES knows."""
    from selfies.grammar_rules import process_atom_symbol, process_branch_symbol, process_ring_symbol

    if process_branch_symbol(symbol) is not None or process_ring_symbol(symbol) is not None:
        return True
    processed = process_atom_symbol(symbol)
    if processed is None:
        return False
    atom = processed[1]
    key = atom.element if not atom.charge else f"{atom.element}{atom.charge:+d}"
    return key in sf.get_semantic_constraints()


def split_symbols(selfies: str) -> list[str]:
    """``"[C][=O]"`` -> ``["[C]", "[=O]"]``."""
    return list(sf.split_selfies(selfies))


def encode_selfies(smiles: str) -> str | None:
    """The SELFIES of a SMILES, or None when RDKit or SELFIES cannot read it."""
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    try:
        return sf.encoder(Chem.MolToSmiles(mol, canonical=True, isomericSmiles=True))
    except sf.EncoderError:
        return None


def decode_selfies(selfies: str) -> str:
    """The SMILES a SELFIES string decodes to (empty when it holds no atom)."""
    try:
        return sf.decoder(selfies)
    except sf.DecoderError:
        return ""


class SelfiesConstraint:
    """Masks a backbone's next-token logits so that the generated text spells SELFIES symbols.

    ``constraint(ids, logits)`` is a ``RowHooks.process_logits``: ids are the row's generated token
    ids so far, logits [V]; disallowed tokens become -inf. ``text_of(ids)`` gives the finished
    symbols only (a row cut by its token budget halfway through a symbol loses that half).
    max_symbols: after that many finished symbols only end-of-sequence is allowed, so a molecule's
    length is bounded in symbols whatever the tokenizer (a byte-level backbone spends one token per
    character, a BPE one far fewer); None leaves the length to the token budget.
    """

    def __init__(self, tokenizer: Any, alphabet: Sequence[str] | None = None, *, max_symbols: int | None = None) -> None:
        """Index the tokenizer's vocabulary by the characters each token spells."""
        self.tokenizer = tokenizer
        self.alphabet = frozenset(alphabet if alphabet is not None else default_alphabet())
        if not self.alphabet:
            raise ValueError("the SELFIES alphabet is empty")
        if max_symbols is not None and max_symbols < 1:
            raise ValueError(f"max_symbols must be at least 1, got {max_symbols}")
        self.max_symbols = max_symbols
        self.first = frozenset(s for s in self.alphabet if not s.startswith(_NOT_FIRST))
        if not self.first:
            raise ValueError("the SELFIES alphabet holds no atom symbol to start a molecule with")
        # prefixes of any symbol, and of a symbol that may come first (else "[Ri" could start a
        # molecule and lead nowhere: "[Ring1]" may not be first)
        self.prefixes = {s[:k] for s in self.alphabet for k in range(1, len(s))}
        self.first_prefixes = {s[:k] for s in self.first for k in range(1, len(s))}
        self.eos = tokenizer.eos_token_id
        chars = set("".join(self.alphabet))
        special = set(getattr(tokenizer, "all_special_ids", ()))
        self.token_text: dict[int, str] = {}
        for token in range(len(tokenizer)):
            if token in special:
                continue
            text = tokenizer.decode([token])
            if text and set(text) <= chars:
                self.token_text[token] = text
        pair = [t for t, text in self.token_text.items() if text in ("[C]", "[", "C", "]")][:2]
        if len(pair) == 2 and tokenizer.decode(pair) != self.token_text[pair[0]] + self.token_text[pair[1]]:
            raise ValueError(
                "the backbone tokenizer's decode puts characters between tokens "
                f"({tokenizer.decode(pair)!r}), so its text cannot be constrained token by token"
            )
        self.by_first: dict[str, list[int]] = {}
        for token, text in self.token_text.items():
            self.by_first.setdefault(text[0], []).append(token)
        self._allowed: dict[tuple[str, bool], Tensor] = {}
        if not self._allowed_ids("", False).numel():
            raise ValueError("the backbone's tokenizer cannot spell any SELFIES symbol")

    def state(self, text: str) -> tuple[str, bool]:
        """(unfinished symbol, whether a symbol is finished) after generated ``text``."""
        cut = text.rfind("]") + 1
        return text[cut:], cut > 0

    def step(self, pending: str, started: bool, piece: str) -> tuple[str, bool] | None:
        """The state after appending ``piece``, or None when the text would leave the language."""
        text = pending + piece
        while text:
            end = text.find("]")
            if end < 0:
                return (text, started) if text in (self.prefixes if started else self.first_prefixes) else None
            symbol = text[: end + 1]
            if symbol not in (self.alphabet if started else self.first):
                return None
            started, text = True, text[end + 1 :]
        return "", started

    def _allowed_ids(self, pending: str, started: bool) -> Tensor:
        key = (pending, started)
        if key not in self._allowed:
            # only tokens whose first character can follow the unfinished symbol
            symbols = self.alphabet if started else self.first
            nexts = {s[len(pending)] for s in symbols if len(s) > len(pending) and s.startswith(pending)}
            ids = [t for c in nexts for t in self.by_first.get(c, ()) if self.step(pending, started, self.token_text[t])]
            if not pending and started and self.eos is not None:
                ids.append(self.eos)
            self._allowed[key] = torch.tensor(sorted(ids), dtype=torch.long)
        return self._allowed[key]

    def max_tokens(self) -> int | None:
        """Backbone tokens enough for ``max_symbols`` of the longest symbol, and the end (None: unbounded)."""
        if self.max_symbols is None:
            return None
        return self.max_symbols * max(len(s) for s in self.alphabet) + 1

    def at_max_symbols(self, text: str) -> bool:
        """True when ``text`` holds ``max_symbols`` finished symbols: only the end may follow."""
        return self.max_symbols is not None and text.count("]") >= self.max_symbols

    def __call__(self, ids: Sequence[int], logits: Tensor) -> Tensor:
        """Logits [V] with every token that would leave the SELFIES language set to -inf."""
        text = "".join(self.token_text[int(i)] for i in ids)
        pending, started = self.state(text)
        if self.eos is not None and not pending and self.at_max_symbols(text):
            allowed = torch.tensor([self.eos], device=logits.device)
        else:
            allowed = self._allowed_ids(pending, started).to(logits.device)
        out = torch.full_like(logits, -torch.inf)
        out[allowed] = logits[allowed]
        return out

    def text_of(self, text: str) -> str:
        """The finished symbols of generated ``text`` (its unfinished tail dropped)."""
        return text[: text.rfind("]") + 1]
