"""The megatron-core releases paci-megatron supports: the one place that says so.

Read by ``setup.py`` (the install requirement), ``tools/release_matrix.py`` (the releases
it tests) and :mod:`paci_megatron.compat` (which holds every difference between them).
Imports nothing.
"""

#: the install requirement on megatron-core
MEGATRON_CORE_REQUIREMENT = "megatron-core>=0.14,<0.21"

#: the releases ``tools/release_matrix.py`` runs the Megatron-LM tests on ("main": the
#: development branch); CI runs the newest that installs on Python 3.11
TESTED_RELEASES = ("0.14.0", "0.16.1", "0.17.1", "0.18.2", "0.19.0", "main")
CI_RELEASE = "0.16.1"
