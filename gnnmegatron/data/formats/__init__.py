"""Readers of the study's data releases, as downloaded, for ``gnnmegatron data import --format``.

=============  ==============================================  ==========================================
format         release files                                   module
=============  ==============================================  ==========================================
``ase``        anything ASE reads (one source per file)        :mod:`.ase_files`
``mptrj``      ``MPtrj_2022.9_full.json`` (pymatgen dicts)     :mod:`.mptrj`
``ani1x``      ``ani1x-release.h5``                            :mod:`.ani1x`
``oc20``       S2EF ``*.extxyz[.xz]`` + ``*.txt[.xz]``, LMDBs  :mod:`.oc20`
``oc22``       S2EF-Total LMDBs                                :mod:`.oc20`
``qm7x``       ``1000.hdf5`` ... ``8000.hdf5``                 :mod:`.qm7x`
``omat24``     ``*.aselmdb`` (ASE-LMDB) or extxyz              :mod:`.aselmdb`
``alexandria`` ``*.aselmdb`` (sAlex) or extxyz                 :mod:`.aselmdb`
=============  ==============================================  ==========================================

Each module's docstring states the release's field names and units, the conversion to the
store's units (eV, Å, eV/Å, eV/Å^3) and the sign conventions. Optional packages (h5py, lmdb,
orjson) are imported only when a reader needs them (``pip install 'gnnmegatron[importers]'``).
"""

from __future__ import annotations

from gnnmegatron.data.formats.ani1x import ANI1xFormat
from gnnmegatron.data.formats.ase_files import AseFormat
from gnnmegatron.data.formats.aselmdb import AlexandriaFormat, OMat24Format
from gnnmegatron.data.formats.base import (DataImportError, ImportOptions, InputError, MissingDependencyError,
                                           OutputError, Rejected, RejectedRecordError, SourceFormat)
from gnnmegatron.data.formats.mptrj import MPtrjFormat
from gnnmegatron.data.formats.oc20 import OC20Format, OC22Format
from gnnmegatron.data.formats.qm7x import QM7XFormat

FORMATS: dict[str, SourceFormat] = {f.name: f for f in (
    AseFormat(), MPtrjFormat(), ANI1xFormat(), OC20Format(), OC22Format(), QM7XFormat(), OMat24Format(),
    AlexandriaFormat())}

__all__ = ["FORMATS", "DataImportError", "ImportOptions", "InputError", "MissingDependencyError", "OutputError",
           "Rejected", "RejectedRecordError", "SourceFormat"]
