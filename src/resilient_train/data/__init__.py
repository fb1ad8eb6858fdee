"""The clips a run trains on, in an order that resumes exactly.

Owns: the built-in synthetic video (:mod:`.synthetic`), the resumable samplers and loaders
(:mod:`.loader`: one seeded permutation per epoch, a rank's slice of each global batch, a start
mid-epoch), and folders of real videos: one file (:mod:`.video`: probe, seek-and-decode,
resize/crop, writing one), the clips of files and their cache (:mod:`.clips`), the files of a
folder, the split and the folder datasets (:mod:`.folder`), the probes kept beside the run
(:mod:`.probes`: ``RUN/data_probes.json``), and the data fingerprint (:mod:`.fingerprint`).

May import: the base (``fsio``), the checkpoint layout's torch-free ``read_small_json`` (for the
probe cache) and ``config``. Nothing that trains.
"""

from .._imports import lazy

_LAZY = {
    "build_data": "loader",
    "build_loader": "loader",
    "batches_per_epoch": "loader",
    "ResumableSampler": "loader",
    "SequentialResumableSampler": "loader",
    "SyntheticVideoDataset": "synthetic",
    "VideoReadError": "video",
    "probe": "video",
    "VideoFile": "video",
    "content_hash": "video",
    "write_video": "video",
    "Preprocessing": "clips",
    "VideoClips": "clips",
    "ProbeCache": "probes",
    "build_folder_datasets": "folder",
    "clips_of": "folder",
    "in_val": "folder",
    "list_videos": "folder",
    "fingerprint_difference": "fingerprint",
}
__all__ = list(_LAZY)
__getattr__ = lazy(__name__, _LAZY)
