"""The run's policy: how its output is judged and reported."""
