"""`python -m kdcache` = the `kdcache` command."""

from kdcache.cli import main

main()
