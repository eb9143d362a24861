"""Checkpoint -> OpenVINO model conversion (torch-free). See the README's Architecture section."""
