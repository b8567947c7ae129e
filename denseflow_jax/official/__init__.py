"""The published (PyTorch) DenseFlow checkpoints: a torch-free reader, weight conversion, export.

  args.py     the published command line (`args.pickle`) -> our config
  layout.py   the state_dict key layout; import into / export from our variables
  convert.py  published model directories -> converted workdirs; state_dict `.npz` files
  reference.py  noise and images of the published code's reference traces (parity tests only)

Everything is numpy; nothing is compiled. The reading of `torch.save` files is
`denseflow_jax.torch_reader` (re-exported here).
"""
from denseflow_jax.official.args import (DATASETS, KNOWN_ARGS, config_from_args,
                                         model_config_from_args)
from denseflow_jax.official.convert import (OfficialModel, load_converted, load_official,
                                            load_state_dict_npz, read_state_dict,
                                            save_converted, save_state_dict_npz)
from denseflow_jax.official.layout import (Entry, export_state_dict, import_state_dict,
                                           state_dict_layout)
from denseflow_jax.torch_reader import (OfficialCheckpointError, UnsafePickleError, read_args,
                                        read_torch_checkpoint)

__all__ = ['OfficialCheckpointError', 'UnsafePickleError', 'read_args', 'read_torch_checkpoint',
           'read_state_dict', 'KNOWN_ARGS', 'DATASETS', 'model_config_from_args',
           'config_from_args', 'Entry', 'state_dict_layout', 'import_state_dict',
           'export_state_dict', 'save_state_dict_npz', 'load_state_dict_npz', 'OfficialModel',
           'load_official', 'save_converted', 'load_converted']
