"""The two trainers (pre-training, fine-tuning) and ``by_kind``, which picks one by
``config.kind``; above evaluation, which they run during and after training."""
