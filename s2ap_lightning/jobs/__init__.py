"""Jobs built from the stages: the Quickstart demo and the paired multi-seed study."""
