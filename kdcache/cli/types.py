"""Click parameter types shared by the commands."""

from __future__ import annotations

import click

from kdcache.cache.storage import is_url


class CacheLocation(click.ParamType):
    """A cache: a local directory, or an object-store URL (``s3://bucket/prefix``, ``gs://...``,
    any fsspec URL), passed on as given. Only a local path is checked here (not a file)."""

    name = "dir|url"

    def convert(self, value, param, ctx):
        if is_url(value):
            return str(value)
        return click.Path(file_okay=False).convert(value, param, ctx)


CACHE = CacheLocation()
