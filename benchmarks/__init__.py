"""`make bench`: what the durable checkpoints and the training loop cost, measured side by side.

Every ratio compares our code with a baseline measured in the same run, on the same state, with
the repetitions of the two interleaved (the order rotates each repetition), so load from other
processes on the machine hits both sides alike; the verdict is the median of at least five such
pairs' ratios, printed with their spread and the load average (:mod:`benchmarks.verdict`). The state is the magvit64
job's (``Trainer.state_dict()`` after one optimizer step, so AdamW moments exist).

  save_vs_raw_fsync        CheckpointManager.save (sync) / the same encoded bytes written with
                           plain os.write + fsync per file (no directory fsync, no hashing)
  save_vs_torch_save       ... / torch.save(state, one_file) (no fsync: not durable)
  save_vs_magvit2_trainer  ... / magvit2_pytorch VideoTokenizerTrainer.save() on the same model
  load_vs_raw_read         load_checkpoint (manifest, sizes, hashes, safe parse) / reading the
                           same files into memory; beside it the same reads hashed, and safetensors'
                           own load_file
  load_vs_torch_load       ... / torch.load of the same state saved with torch.save (no verification)
  loop_vs_bare_tiny        steps/s of Trainer.fit (no checkpoints, no eval inside the window) /
  loop_vs_bare_magvit64    steps/s of a bare loop over the same model, data and optimizers
  async_stall_vs_sync      time Trainer.save_checkpoint blocks the loop with async_save / without;
                           printed beside it, the floor: one plain copy of the same bytes / without
  resume_vs_fresh_start    process start -> first trained step of the magvit64 job (65.5 MB state)
                           via `python -m resilient_train.cli`, resuming / starting fresh
  resume_vs_floor          the same resume / a bare `python -c` importing torch and magvit2-pytorch and
                           building the model (what any restart pays); beside it, the resume.timing phases
  resume_vs_floor_with_step  the same resume / that floor followed by one plain training step of the job
  rollback_vs_restart      a NaN at the resumed run's first step: fault -> that step computed again after the
                           in-process rollback / the restart's Popen -> first new step (reported)
  goodput_chaos_vs_reference  one `python -m resilient_train.chaos` trial: the undisturbed arm's wall time / the
                           disturbed arm's; beside it useful / computed steps and, per fault kind, fault -> first
                           new step (reported)
  save_every_step_vs_never_tiny, save_every_step_vs_never_magvit64
                           wall time of Trainer.fit checkpointing every step (async) / never
  folder_vs_synthetic_tiny, folder_vs_synthetic_magvit64
                           steps/s of Trainer.fit on a folder of real h264 videos (data.cache=disk, warm)
                           / on synthetic clips of the same shape; beside it, the cold first pass over
                           the folder (decode, resize, cache write) and a warm pass, per clip
  folder_resume_cached_vs_probed  a magvit64 resume on that folder, its probes kept beside the run / the same
                           with them removed; beside it both resume.timing phases (reported)
  ranks2_vs_1_steps_per_s  tiny, the same global batch (4 clips a step): steps/s of 2 ranks under
                           torchrun (1 thread each, DDP over gloo) / steps/s of 1 process (2 threads);
                           on one machine both use the same 2 cores for the same arithmetic: 1.0 is
                           parity, below it is the cost of the gradient exchange and the per-step
                           stop-flag all-reduce, above it the 2-thread process scaling worse than 2
                           single-thread ranks (more cores would let the ranks run truly in parallel)
  ranks2_vs_1_save_s       seconds of a checkpoint save (rank 0's ckpt.save line) at 2 ranks / at 1:
                           the commit round trip (broadcast, gather of the votes, verdict)
  upload_vs_raw_put        checkpoint.remote.upload of the magvit64 checkpoint to moto's S3 server on
                           127.0.0.1 (files, one listing confirming sizes, manifest last) / obstore.put of
                           the same files (the floor through this client)
  download_verify_vs_raw_get  remote_checkpoints + remote.download + load_checkpoint into a fresh folder /
                           obstore.get of the same objects into files, fsync each (the floor, the same way)
  stall_remote_vs_local    wall time of Trainer.fit (magvit64) checkpointing every 3 steps, uploader on / off
  precision_<p>_<eager|compiled>_vs_32
                           steps/s of Trainer.fit (magvit64) in trainer.precision=32|bf16-mixed|16-mixed,
                           compile off and on / in float32 without compile; beside it the kernel ratio
                           (a residual block's convolution alone in that precision / in float32: what the
                           processor's arithmetic gives) and the peak RSS of a process in that precision
  recovery_remote_vs_local a lost node: process start -> first new step resuming from the store in an empty
                           run directory / resuming from the same checkpoint on the local disk (reported)

Writes a JSON report (``--out``, default ``outputs/bench/bench.json`` under the working directory)
with the ratios, the absolute seconds and bytes behind each, every sample, and the machine.
``--quick`` runs fewer repetitions.

``python -m benchmarks`` runs it (:mod:`benchmarks.run`: ``--quick``, ``--out``, ``--only``). One module a
measurement: ``save_load`` (save_*, load_*), ``hash_throughput`` (GB/s of each hash, no ratio),
``async_stall``, ``loop`` (loop_vs_bare_*, save_every_step_vs_never_*), ``remote`` (the object store's four rows),
``precision`` (precision_*),
``resume``, ``recovery`` (rollback_vs_restart, goodput_*), ``folder``, ``ranks``;
beside them ``timing`` (how everything is timed), ``verdict`` (the median of the pairs), ``report`` (targets,
table, JSON) and ``jobs`` (what they run). ``python -m benchmarks.gpu`` is the GPU bench of ``scripts/gpu_check.sh``.
"""
