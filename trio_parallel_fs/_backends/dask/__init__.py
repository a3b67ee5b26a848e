"""The Dask backend's pieces; its front end is the public ``trio_parallel_fs.dask``."""
