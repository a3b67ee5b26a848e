"""The spawn backend: each worker a fresh interpreter, the parent's own child,
over a socketpair or the portable loopback channel, watched for the memory
ceiling by the parent."""
