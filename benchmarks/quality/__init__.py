"""Quality benchmark (issue 4): does distillation from a kdcache cache work on a real teacher?

Run ``python -m benchmarks.quality.run --help`` from the repository root; see README.md here.
"""
