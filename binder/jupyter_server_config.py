# Jupyter server settings of the Binder image (postBuild copies this file to ~/.jupyter/).
#
# Binder's free tier gives one participant about 2 GiB of memory, and JupyterLab keeps a
# notebook's kernel running after its tab is closed: a participant who goes through the series
# in order would otherwise keep one kernel (300-600 MiB each) per notebook. Kernels idle for
# 15 minutes are shut down, even with their tab open, so someone who spends about ten minutes per
# notebook keeps at most two or three kernels alive. A notebook whose kernel was shut down says so
# when its next cell runs; Run All restarts it.
c = get_config()  # noqa: F821 (provided by Jupyter when it loads this file)

c.MappingKernelManager.cull_idle_timeout = 15 * 60   # seconds without execution before a kernel is culled
c.MappingKernelManager.cull_interval = 60            # how often idle kernels are looked for
c.MappingKernelManager.cull_connected = True         # also kernels whose notebook tab is still open
c.MappingKernelManager.cull_busy = False             # never a kernel that is running a cell
c.TerminalManager.cull_inactive_timeout = 30 * 60    # idle terminals too
c.TerminalManager.cull_interval = 300
