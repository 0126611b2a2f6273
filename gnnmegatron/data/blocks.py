"""Blocks of structures in columns, and their validation in one pass of numpy per block.

The importers hand the writer structures a block at a time (:class:`StructureBlock`: B
structures, N atoms in all, each field one array) instead of one dict at a time, so that the
checks of :func:`gnnmegatron.data.schema.validate_structure` (element range, NaN/inf, shapes,
degenerate periodic cells, atoms closer than ``min_distance``) cost a few numpy calls per block
rather than ~30 per structure.

Exactness: the block checks are a *screen*. :func:`screen_block` marks a row ``suspect``
whenever it cannot prove, with a margin, that :func:`validate_structure` accepts it (any NaN, an
element out of range, a shape or type it does not handle, a cell near the degeneracy limits, a
pair of atoms that might be closer than the threshold). Suspect rows go through
``validate_structure`` itself, which gives the exact error (or accepts them); rows that pass the
screen are accepted with the values ``validate_structure`` would have returned (the same dtype
conversions, Voigt stress expanded the same way). So a block gives the same store, the same
errors and the same rejections as structures validated one by one (tested on awkward inputs in
tests/data/test_blocks.py).

Close pairs: atoms are wrapped into the cell along periodic directions, atoms within
``min_distance`` of a periodic face get ghost images (the 26 neighbouring-cell shifts they can
need), and all points of the block are sorted along one direction (keyed by structure); a pair
closer than the threshold is closer than it along that direction too, so only runs of points
within the threshold of each other in that order are compared in 3-D. That costs O(N log N) for
the block (N atoms), against the O(n^2) all-pairs matrix per structure of the reference.

Shapes (B structures, N atoms): ``counts`` [B], per-atom arrays [N] / [N, 3], per-structure
``cell`` / ``stress`` [B, 3, 3], ``pbc`` [B, 3], ``energy`` [B].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from gnnmegatron.data.schema import MAX_Z, MIN_DISTANCE, STRUCTURE_KEYS

# Relative margins of the screen: a row closer than this to a limit of validate_structure goes
# through validate_structure itself (the screen's arithmetic differs from the reference's in
# the last bits; these margins are ~1e9 times the rounding error of well-conditioned cells).
_DIST_MARGIN = 1e-6     # distances: threshold * (1 + margin)
_HEIGHT_MARGIN = 1e-4   # periodic cell heights: 2 * threshold * (1 + margin)
_DET_RATIO = 1e-9       # |det| / prod |a_i| (the reference refuses <= 1e-12)
_SVD_RATIO = 1e-6       # smallest / largest singular value of a 2-row periodic basis (reference: 1e-8)
# Direction the close-pair sweep sorts along: 1, sqrt(2), sqrt(3) are rationally independent, so
# the atoms of a crystal aligned with the axes do not share projections.
_SWEEP_DIR = np.array([1.0, 2.0 ** 0.5, 3.0 ** 0.5]) / 6.0 ** 0.5
_VOIGT = np.array([0, 5, 4, 5, 1, 3, 4, 3, 2])  # [xx yy zz yz xz xy] -> row-major [3, 3]
_ZERO33 = np.zeros((3, 3))


@dataclasses.dataclass
class StructureBlock:
    """B structures in columns (the writer's unit of work).

    Rows whose ``suspect`` flag is set are validated one by one from ``structure(row)`` (their
    columns are not used; their ``counts`` are 0). ``source`` is -1 where the structure has none
    (the append call's default applies).

    Shapes: counts [B] int64; atomic_numbers [N] int64; positions, forces [N, 3] float64 (forces
    zero where ``has_forces`` is False); energy [B] float64; cell, stress [B, 3, 3] float64; pbc
    [B, 3] bool; has_* [B] bool; source [B] int64; ids: B strings ("" for none).
    """

    counts: np.ndarray
    atomic_numbers: np.ndarray
    positions: np.ndarray
    forces: np.ndarray
    has_forces: np.ndarray
    energy: np.ndarray
    has_energy: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    stress: np.ndarray
    has_stress: np.ndarray
    source: np.ndarray
    ids: list
    suspect: np.ndarray
    originals: Sequence | None = None       # per-row input structures (dicts), if the block was built from them
    row_dict: Callable | None = None        # else: row -> the structure dict a per-frame reader would give

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def structure(self, row: int):
        """The structure of ``row`` as validate_structure takes it (the input of the reference path)."""
        if self.originals is not None:
            return self.originals[row]
        return self.row_dict(row)

    def take(self, rows) -> "StructureBlock":
        """The block of the given rows (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        off = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.counts, out=off[1:])
        atoms = _ranges(off[rows], off[rows + 1])
        base = self.row_dict
        return StructureBlock(
            counts=self.counts[rows], atomic_numbers=self.atomic_numbers[atoms], positions=self.positions[atoms],
            forces=self.forces[atoms], has_forces=self.has_forces[rows], energy=self.energy[rows],
            has_energy=self.has_energy[rows], cell=self.cell[rows], pbc=self.pbc[rows], stress=self.stress[rows],
            has_stress=self.has_stress[rows], source=self.source[rows], ids=[self.ids[r] for r in rows.tolist()],
            suspect=self.suspect[rows],
            originals=None if self.originals is None else [self.originals[r] for r in rows.tolist()],
            row_dict=None if base is None else (lambda r, _m=rows: base(int(_m[r]))))


def _ranges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Concatenation of arange(a[k], b[k]) over k (int64)."""
    n = b - a
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(a - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return np.arange(total, dtype=np.int64) + starts


def _is_float_array(x, shape) -> bool:
    return type(x) is np.ndarray and x.shape == shape and x.dtype.kind == "f"


def block_from_structures(structures: Sequence) -> StructureBlock:
    """Columns of structure dicts (as readers yield them); rows the fast path does not take are ``suspect``.

    The fast path takes dicts whose arrays are numpy arrays of the right shapes and kinds
    (integer atomic numbers, floating positions/forces/cell/stress, bool pbc), Python-float
    energies and int sources; anything else (lists, ase.Atoms, NaN checks aside) is left to
    validate_structure.
    """
    B = len(structures)
    counts = np.zeros(B, dtype=np.int64)
    suspect = np.zeros(B, dtype=bool)
    zs, ps, fs, f_rows = [], [], [], []
    cells, cell_rows, pbcs, pbc_rows, stresses, stress_rows, voigts, voigt_rows = [], [], [], [], [], [], [], []
    energy = np.zeros(B)
    has_energy = np.zeros(B, dtype=bool)
    source = np.full(B, -1, dtype=np.int64)
    ids = [""] * B
    keys = STRUCTURE_KEYS
    for r, s in enumerate(structures):
        if type(s) is not dict or not s.keys() <= keys:
            suspect[r] = True
            continue
        z, pos = s.get("atomic_numbers"), s.get("positions")
        if type(z) is not np.ndarray or z.ndim != 1 or z.dtype.kind not in "iu" or not z.shape[0]:
            suspect[r] = True
            continue
        n = z.shape[0]
        if not _is_float_array(pos, (n, 3)):
            suspect[r] = True
            continue
        f, cell, pbc, e, st, src = (s.get("forces"), s.get("cell"), s.get("pbc"), s.get("energy"), s.get("stress"),
                                    s.get("source"))
        if (f is not None and not _is_float_array(f, (n, 3))) \
                or (cell is not None and not _is_float_array(cell, (3, 3))) \
                or (pbc is not None and not (type(pbc) is np.ndarray and pbc.shape == (3,) and pbc.dtype == bool)) \
                or (e is not None and type(e) is not float) or (src is not None and (type(src) is not int or src < 0)):
            suspect[r] = True
            continue
        if st is not None:
            if _is_float_array(st, (3, 3)):
                stresses.append(st)
                stress_rows.append(r)
            elif _is_float_array(st, (6,)):
                voigts.append(st)
                voigt_rows.append(r)
            else:
                suspect[r] = True
                continue
        counts[r] = n
        zs.append(z)
        ps.append(pos)
        if f is not None:
            fs.append(f)
            f_rows.append(r)
        if cell is not None:
            cells.append(cell)
            cell_rows.append(r)
        if pbc is not None:
            pbcs.append(pbc)
            pbc_rows.append(r)
        if e is not None:
            energy[r] = e
            has_energy[r] = True
        if src is not None:
            source[r] = src
        sid = s.get("id")
        if sid is not None:
            ids[r] = str(sid)
    N = int(counts.sum())
    z = np.concatenate(zs, dtype=np.int64, casting="unsafe") if zs else np.zeros(0, dtype=np.int64)
    pos = np.concatenate(ps, dtype=np.float64) if ps else np.zeros((0, 3))
    forces = np.zeros((N, 3))
    has_forces = np.zeros(B, dtype=bool)
    if fs:
        has_forces[f_rows] = True
        if len(fs) == len(zs):
            forces = np.concatenate(fs, dtype=np.float64)
        else:
            off = np.zeros(B + 1, dtype=np.int64)
            np.cumsum(counts, out=off[1:])
            fr = np.asarray(f_rows)
            forces[_ranges(off[fr], off[fr + 1])] = np.concatenate(fs, dtype=np.float64)
    cell = np.zeros((B, 3, 3))
    if cells:
        cell[cell_rows] = np.stack(cells)
    pbc = np.zeros((B, 3), dtype=bool)
    if pbcs:
        pbc[pbc_rows] = np.stack(pbcs)
    stress = np.zeros((B, 3, 3))
    has_stress = np.zeros(B, dtype=bool)
    if stresses:
        stress[stress_rows] = np.stack(stresses)
        has_stress[stress_rows] = True
    if voigts:
        stress[voigt_rows] = np.stack(voigts).astype(np.float64)[:, _VOIGT].reshape(-1, 3, 3)
        has_stress[voigt_rows] = True
    return StructureBlock(counts=counts, atomic_numbers=z, positions=pos, forces=forces, has_forces=has_forces,
                          energy=energy, has_energy=has_energy, cell=cell, pbc=pbc, stress=stress,
                          has_stress=has_stress, source=source, ids=ids, suspect=suspect, originals=structures)


def columns_block(counts, numbers, positions, forces, energy: list, cell, pbc, stress: list | None, ids: list,
                  row_dict: Callable) -> StructureBlock:
    """A block from columns a reader decoded together (forces [N, 3] for every row, or None for none).

    ``energy``: per row a float or None; ``stress``: per row None, [3, 3] or Voigt [6] (float arrays),
    or None for no stress at all; ``row_dict(row)`` gives the per-frame reader's dict of a row.
    """
    B = len(counts)
    has_e = np.array([e is not None for e in energy], dtype=bool)
    e = np.array([0.0 if v is None else v for v in energy], dtype=np.float64)
    st = np.zeros((B, 3, 3))
    has_s = np.zeros(B, dtype=bool)
    suspect = np.zeros(B, dtype=bool)
    if stress is not None:
        for r, v in enumerate(stress):
            if v is None:
                continue
            if v.shape == (6,):
                st[r] = np.asarray(v, dtype=np.float64)[_VOIGT].reshape(3, 3)
            elif v.shape == (3, 3):
                st[r] = v
            else:
                suspect[r] = True
            has_s[r] = True
    N = int(np.sum(counts))
    return StructureBlock(
        counts=np.asarray(counts, dtype=np.int64), atomic_numbers=np.asarray(numbers, dtype=np.int64),
        positions=np.asarray(positions, dtype=np.float64),
        forces=np.zeros((N, 3)) if forces is None else np.asarray(forces, dtype=np.float64),
        has_forces=np.full(B, forces is not None), energy=e, has_energy=has_e,
        cell=np.asarray(cell, dtype=np.float64), pbc=np.asarray(pbc, dtype=bool), stress=st, has_stress=has_s,
        source=np.full(B, -1, dtype=np.int64), ids=ids, suspect=suspect, row_dict=row_dict)


def _rows_of(bad_atoms: np.ndarray, off: np.ndarray) -> np.ndarray:
    """Rows (structures) holding the given atom indices."""
    return np.searchsorted(off, bad_atoms, side="right") - 1


def screen_block(block: StructureBlock, known_elements=None, min_distance: float = MIN_DISTANCE) -> np.ndarray:
    """Rows that must be validated one by one (``block.suspect`` plus every row the screen cannot clear).

    Returns a bool array [B]; a row not in it is accepted by validate_structure with the values
    of the block's columns.
    """
    B = len(block)
    suspect = block.suspect.copy()
    if B == 0:
        return suspect
    off = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(block.counts, out=off[1:])
    z = block.atomic_numbers
    bad = (z < 1) | (z > MAX_Z)
    if known_elements is not None:
        bad |= ~np.isin(z, np.asarray(list(known_elements), dtype=np.int64))
    if bad.any():
        suspect[_rows_of(np.flatnonzero(bad), off)] = True
    for arr in (block.positions, block.forces):
        fin = np.isfinite(arr)
        if not fin.all():
            suspect[_rows_of(np.flatnonzero(~fin.all(axis=1)), off)] = True
    for arr in (block.cell, block.stress):
        fin = np.isfinite(arr).reshape(B, 9).all(axis=1)
        suspect |= ~fin
    suspect |= ~np.isfinite(block.energy)
    ok = ~suspect
    cell_ok, wrap = _screen_cells(block.cell, block.pbc, min_distance, ok)
    suspect |= ~cell_ok
    hits = _close_pair_rows(block.positions, off, block.pbc, wrap, ~suspect, min_distance)
    suspect[hits] = True
    return suspect


def _screen_cells(cell: np.ndarray, pbc: np.ndarray, min_distance: float, rows: np.ndarray):
    """Which rows' periodic cells clearly pass validate_structure's checks, and their wrapping data.

    Returns (ok [B] bool, wrap) where wrap = (dual [B, 3, 3], lattice [B, 3, 3], tol [B, 3]): the
    fractional coordinate of atom x along the row's j-th periodic direction is ``x @ dual[:, j]``,
    ``lattice[j]`` is that lattice vector, and ``tol[j]`` the fractional distance from a face within
    which an atom needs a ghost image (0 for j beyond the periodic directions).
    """
    B = cell.shape[0]
    ok = np.ones(B, dtype=bool)
    dual = np.zeros((B, 3, 3))
    lat = np.zeros((B, 3, 3))
    tol = np.zeros((B, 3))
    k = pbc.sum(axis=1)
    thr = min_distance * (1 + _DIST_MARGIN)
    for kk in (1, 2, 3):
        sel = np.flatnonzero(rows & (k == kk))
        if not sel.size:
            continue
        m = sel.size
        per = cell[sel][pbc[sel]].reshape(m, kk, 3)          # the periodic rows, in order
        norms = np.sqrt(np.einsum("mkc,mkc->mk", per, per))
        good = np.ones(m, dtype=bool)
        if kk == 3:
            basis = per
        elif kk == 2:
            nrm = np.cross(per[:, 0], per[:, 1])
            area = np.sqrt(np.einsum("mc,mc->m", nrm, nrm))
            good &= area > _SVD_RATIO * (norms ** 2).sum(axis=1)  # smallest / largest singular value > 1e-6
            nrm = nrm / np.where(area > 0, area, 1.0)[:, None]
            basis = np.concatenate([per, nrm[:, None, :]], axis=1)
        else:
            a = per[:, 0]
            good &= norms[:, 0] > 0
            unit = a / np.where(norms[:, 0] > 0, norms[:, 0], 1.0)[:, None]
            helper = np.where((np.abs(unit[:, 0]) < 0.9)[:, None], [[1.0, 0, 0]], [[0, 1.0, 0]])
            e1 = np.cross(unit, helper)
            e1 /= np.sqrt(np.einsum("mc,mc->m", e1, e1))[:, None]
            e2 = np.cross(unit, e1)
            basis = np.stack([a, e1, e2], axis=1)
        det = np.abs(np.linalg.det(basis))
        good &= det > _DET_RATIO * np.prod(norms, axis=1)
        inv = np.zeros_like(basis)
        if good.any():
            inv[good] = np.linalg.inv(basis[good])
        heights = 1.0 / np.sqrt((inv[:, :, :kk] ** 2).sum(axis=1)).clip(1e-300)  # [m, kk]
        good &= heights.min(axis=1) >= 2 * min_distance * (1 + _HEIGHT_MARGIN)
        ok[sel] = good
        dual[sel, :, :kk] = inv[:, :, :kk]
        lat[sel, :kk] = per
        tol[sel, :kk] = thr / heights + 1e-9
    return ok, (dual, lat, tol)


def _close_pair_rows(pos: np.ndarray, off: np.ndarray, pbc: np.ndarray, wrap, rows: np.ndarray,
                     min_distance: float) -> np.ndarray:
    """Rows among ``rows`` that may hold two atoms closer than ``min_distance`` (minimum image).

    Measured (one core of the shared 2-core machine, blocks of 256): 72 atoms in triclinic cells with
    half the atoms on or outside a face (many ghosts) 12-19 µs per structure against 50-70 µs for the
    reference's all-pairs matrix; 30 atoms 6 µs against 48; 15-atom molecules 0.6 µs against 17.
    """
    B = off.shape[0] - 1
    counts = np.diff(off)
    atom_rows = np.repeat(np.arange(B), counts)
    take = (rows & (counts > 1))[atom_rows]
    if not take.any():
        return np.zeros(0, dtype=np.int64)
    if take.all():
        x, sid = pos.copy(), atom_rows
    else:
        idx = np.flatnonzero(take)
        x, sid = pos[idx], atom_rows[idx]
    dual, lat, tol = wrap
    pa = np.flatnonzero(pbc.any(axis=1)[sid])
    if pa.size:
        xs, ss = x[pa], sid[pa]
        u = np.einsum("nc,ncj->nj", xs, dual[ss])  # fractional coordinates along the periodic directions
        f = np.floor(u)
        out = np.flatnonzero(f.any(axis=1))
        if out.size:  # wrap atoms outside the cell back in
            x[pa[out]] -= np.einsum("nj,njc->nc", f[out], lat[ss[out]])
            u[out] -= f[out]
        t = tol[ss]
        lo, hi = u < t, u > 1 - t
        near = np.flatnonzero((lo | hi).any(axis=1))
        if near.size:
            # ghost images: per periodic direction, every image made so far of an atom near the lower
            # face is copied one lattice vector up (near the upper face: down), so an atom near
            # several faces gets all the combinations it can need (up to 26)
            gx, gs, glo, ghi = x[pa[near]], ss[near], lo[near], hi[near]
            px, ps = [], []
            for j in range(3):
                for side, sign in ((glo, 1.0), (ghi, -1.0)):
                    sel = np.flatnonzero(side[:, j])
                    if not sel.size:
                        continue
                    nx = gx[sel] + sign * lat[gs[sel], j]
                    px.append(nx)
                    ps.append(gs[sel])
                    if j < 2:
                        gx, gs = np.concatenate([gx, nx]), np.concatenate([gs, gs[sel]])
                        glo, ghi = np.concatenate([glo, glo[sel]]), np.concatenate([ghi, ghi[sel]])
            if px:
                x = np.concatenate([x] + px)
                sid = np.concatenate([sid] + ps)
    p = x @ _SWEEP_DIR
    thr = min_distance * (1 + _DIST_MARGIN)
    # sort by (structure, projection): consecutive structures' keys are > thr apart, and key
    # differences within a structure are exact to ~1e-16 * B * span (far below the margin)
    span = float(p.max() - p.min()) + 2 * thr + 1.0
    if span * B > 1e8:
        order = np.lexsort((p, sid))  # exact; pairs across structures are filtered out below
        key = p[order]
        same = sid[order]
    else:
        key = p + sid * span
        order = np.argsort(key)
        key = key[order]
        same = None
    hit_rows = []
    for step in range(1, key.size):
        cand = np.flatnonzero(key[step:] - key[:-step] < thr)
        if same is not None and cand.size:
            cand = cand[same[cand + step] == same[cand]]
        if not cand.size:
            break
        a = order[cand]
        d = x[order[cand + step]] - x[a]
        close = np.einsum("nc,nc->n", d, d) < thr * thr
        if close.any():
            hit_rows.append(sid[a[close]])
    if not hit_rows:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(hit_rows))


__all__ = ["StructureBlock", "block_from_structures", "columns_block", "screen_block"]
