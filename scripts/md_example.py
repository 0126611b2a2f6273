"""Relax a Cu-Au alloy with a trained gnnmegatron model, then run 1 ps of NVE MD and report the drift.

The README example. After ``make demo`` (which trains ``runs/demo``)::

    .venv/bin/python scripts/md_example.py --source emt          # runs/demo, 1 ps, prints + writes md_example.json
    .venv/bin/python scripts/md_example.py --model runs/demo/checkpoints/step_00001200 --source emt --device cuda

Steps:

1. ``bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 2, 2)`` (32 atoms), half of the atoms (drawn with
   ``--seed``) turned into Au.
2. BFGS relaxation of positions and cell (``FrechetCellFilter``, needs a conservative model;
   positions only otherwise) to ``fmax`` 0.05 eV/Å with steps bounded by ``maxstep`` 0.05 Å and at
   most ``--relax-steps`` iterations.
3. Velocities from a Maxwell-Boltzmann distribution at 300 K (seeded, zero total momentum), then
   velocity-Verlet NVE at 1 fs for 1 ps, total energy recorded every ``--log-every`` steps.
4. Drift: least-squares slope of the total energy per atom against time (eV/atom/ps) and the
   largest excursion from the starting energy (eV/atom).

Small cells run fastest on one CPU thread (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_alloy(a: float = 3.7, repeat: int = 2, seed: int = 0):
    """fcc Cu supercell (cubic, ``repeat``^3 cells) with half of its atoms replaced by Au at random."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=a, cubic=True) * (repeat, repeat, repeat)
    rng = np.random.default_rng(seed)
    au = rng.permutation(len(atoms))[: len(atoms) // 2]
    numbers = atoms.numbers.copy()
    numbers[au] = 79
    atoms.numbers = numbers
    return atoms


def maxwell_boltzmann(atoms, temperature: float, seed: int) -> None:
    """Seeded Maxwell-Boltzmann momenta with zero total momentum (ASE >= 3.29 ``thermalize_momenta``)."""
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature, rng=rng)
    else:  # ASE < 3.29
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    vd.Stationary(atoms)


def relax(atoms, fmax: float, steps: int, maxstep: float, relax_cell: bool) -> dict:
    """BFGS (positions and, if asked, the cell); returns a summary."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS

    target = FrechetCellFilter(atoms) if relax_cell else atoms
    e0 = atoms.get_potential_energy()
    opt = BFGS(target, maxstep=maxstep, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    forces = atoms.get_forces()
    return {
        "converged": converged,
        "steps": int(opt.nsteps),
        "relax_cell": relax_cell,
        "energy_start_eV": float(e0),
        "energy_end_eV": float(atoms.get_potential_energy()),
        "max_force_eV_per_A": float(np.linalg.norm(forces, axis=1).max()),
        "volume_A3": float(atoms.get_volume()),
    }


def nve(atoms, temperature: float, timestep_fs: float, steps: int, log_every: int, seed: int) -> dict:
    """Velocity-Verlet NVE from Maxwell-Boltzmann velocities; energy drift and timing."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    maxwell_boltzmann(atoms, temperature, seed)
    n = len(atoms)
    times, energies, temps = [], [], []

    def record():
        times.append(dyn.get_number_of_steps() * timestep_fs / 1000.0)  # ps
        energies.append(atoms.get_total_energy() / n)
        temps.append(atoms.get_temperature())

    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs, logfile=None)
    dyn.attach(record, interval=log_every)
    t0 = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - t0
    t, e = np.asarray(times), np.asarray(energies)
    slope = float(np.polyfit(t, e, 1)[0]) if len(t) > 1 else 0.0
    return {
        "steps": steps,
        "timestep_fs": timestep_fs,
        "duration_ps": steps * timestep_fs / 1000.0,
        "temperature_start_K": float(temps[0]),
        "temperature_mean_K": float(np.mean(temps)),
        "total_energy_start_eV_per_atom": float(e[0]),
        "total_energy_end_eV_per_atom": float(e[-1]),
        "drift_eV_per_atom": float(e[-1] - e[0]),
        "drift_eV_per_atom_per_ps": slope,
        "max_excursion_eV_per_atom": float(np.abs(e - e[0]).max()),
        "seconds": seconds,
        "steps_per_s": steps / max(seconds, 1e-9),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo", help="run directory or checkpoint (default: runs/demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--source", default=None,
                        help="for a model trained on several sources: the one whose energies to use (the demo "
                             "model's EMT metals: emt)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small cells: 1 is fastest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lattice", type=float, default=3.7, help="starting fcc lattice constant (Å)")
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--maxstep", type=float, default=0.05, help="largest BFGS step (Å)")
    parser.add_argument("--relax-steps", type=int, default=300)
    parser.add_argument("--no-cell", action="store_true", help="relax positions only")
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--md-steps", type=int, default=1000, help="1000 x 1 fs = 1 ps")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skin", type=float, default=1.0, help="neighbour-list skin (Å)")
    parser.add_argument("--out", default="md_example.json")
    args = parser.parse_args(argv)

    import torch

    from gnnmegatron.inference import GNNMegatronCalculator, ModelLoadError, UnknownSourceError
    from gnnmegatron.inference.loading import describe

    torch.set_num_threads(args.threads)
    try:
        calc = GNNMegatronCalculator(args.model, device=args.device, dtype=args.dtype, skin=args.skin,
                                     source=args.source)
    except ModelLoadError as exc:
        sys.exit(f"error: {exc}\n(train the demo model first with `make demo`, or pass --model)")
    except UnknownSourceError as exc:
        sys.exit(f"error: {exc}\n(pass --source NAME; the demo model's EMT metals are --source emt)")
    print(f"model: {describe(calc.info)}")
    atoms = build_alloy(args.lattice, seed=args.seed)
    atoms.calc = calc
    print(f"structure: {atoms.get_chemical_formula()} ({len(atoms)} atoms), a = {args.lattice} Å")

    relax_cell = calc.conservative and not args.no_cell
    r = relax(atoms, args.fmax, args.relax_steps, args.maxstep, relax_cell)
    print(f"BFGS ({'positions + cell' if relax_cell else 'positions'}): {r['steps']} steps, "
          f"{'converged' if r['converged'] else 'NOT converged'}, E {r['energy_start_eV']:.4f} -> "
          f"{r['energy_end_eV']:.4f} eV, max |F| {r['max_force_eV_per_A']:.4f} eV/Å, "
          f"V {r['volume_A3']:.2f} Å^3")

    builds_before = calc.neighbor_list_builds
    m = nve(atoms, args.temperature, args.timestep, args.md_steps, args.log_every, args.seed)
    m["neighbor_list_builds"] = calc.neighbor_list_builds - builds_before
    print(f"NVE {m['duration_ps']:.3g} ps at {args.timestep} fs ({m['steps_per_s']:.1f} steps/s, "
          f"mean T {m['temperature_mean_K']:.0f} K, {m['neighbor_list_builds']} neighbour-list builds):")
    print(f"  total-energy drift {m['drift_eV_per_atom']:+.3e} eV/atom "
          f"(fit {m['drift_eV_per_atom_per_ps']:+.3e} eV/atom/ps), "
          f"largest excursion {m['max_excursion_eV_per_atom']:.3e} eV/atom")

    result = {
        "model": str(calc.info.path),
        "model_step": calc.info.step,
        "device": args.device,
        "dtype": args.dtype,
        "source": calc.source,
        "structure": {"formula": atoms.get_chemical_formula(), "atoms": len(atoms), "lattice_A": args.lattice,
                      "seed": args.seed},
        "relax": r,
        "md": m,
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
