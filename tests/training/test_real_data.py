"""A few pretraining steps on real DFT data (../shared/data/oxides.db); skipped where it is absent."""

import os
from pathlib import Path

import pytest

from gnnmegatron.training.config import load_config
from gnnmegatron.training.trainer import Trainer

SHARED = Path(os.environ.get("GNNMEGATRON_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
OXIDES = SHARED / "oxides.db"


@pytest.mark.skipif(not OXIDES.exists(), reason=f"real-data file {OXIDES} is absent (set GNNMEGATRON_SHARED_DATA)")
def test_oxides_config_trains_a_few_steps(tmp_path):
    from gnnmegatron.cli import DEMO_CONFIG
    from gnnmegatron.data.importers import import_ase

    store = tmp_path / "oxides.zarr"
    import_ase([str(OXIDES)], store, progress=False)
    cfg = load_config(DEMO_CONFIG.parent / "oxides.yaml", [
        f"data.store={store}", f"run_dir={tmp_path / 'run'}", "model.preset=egnn-tiny", "train.max_steps=4",
        "train.eval_every=4", "train.progress=false"])
    report = Trainer(cfg, resume="never").fit()
    assert report["graphs"] == {"train": 236, "val": 30, "test": 29}
    assert report["val"]["graphs"] == 30
    assert 0 < report["val"]["energy_mae_per_atom"] < 10
