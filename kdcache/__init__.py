"""kdcache: offline knowledge distillation through a cache of teacher distributions.

Stage one (`kdcache.teacher`) scores a dataset with a teacher model and writes the
teacher's sparse next-token distributions into Parquet shards (`kdcache.cache`).
Stage two (`kdcache.student`) trains a student against those shards.
"""

__version__ = "0.6.0"
