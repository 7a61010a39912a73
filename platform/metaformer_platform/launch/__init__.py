"""Launch: the job plan, the driver-side checks, the Ray TorchTrainer around the workers, the CLI."""
