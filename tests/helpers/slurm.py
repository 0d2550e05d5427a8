"""The environment ``srun`` gives a task, for tests that run the CLI as a SLURM job would."""


def srun_environment(task: int, nodes: int, port: int | None = None) -> dict[str, str]:
    """Task ``task`` of ``sbatch --nodes=<nodes> --ntasks-per-node=1``. MASTER_ADDR (and PORT)
    stand in for Lightning resolving the first host of SLURM_NODELIST."""
    environment = {
        "SLURM_NTASKS": str(nodes), "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": str(nodes),
        "SLURM_PROCID": str(task), "SLURM_LOCALID": "0", "SLURM_NODEID": str(task),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "simclr-r18", "SLURM_NODELIST": f"node[0-{nodes - 1}]",
        "MASTER_ADDR": "127.0.0.1",
    }
    if port is not None:
        environment["MASTER_PORT"] = str(port)
    return environment
