"""`python -m MODULE --help` for many modules at the cost of one interpreter start.

Every tool imports JAX, Flax, Orbax, Grain and TFDS at start-up (about 2.7 s each on the
test machine). `help_outputs` starts ONE fresh interpreter that imports those
libraries, then forks a child per module; the child runs the module as `__main__` with
`--help`, exactly as `python -m` would from that point, and reports its exit status and
output. The parent never initialises a JAX backend and starts no threads, so forking is
safe. Run this file as a script: `python tests/module_help.py MODULE...` prints
`{module: [exit status, output]}` as JSON.
"""

import json
import os
import runpy
import subprocess
import sys
import tempfile

# The libraries the tools share (imported once, in the parent).
SHARED_IMPORTS = (
    "jax",
    "flax.linen",
    "optax",
    "orbax.checkpoint",
    "grain",
    "tensorflow_datasets",
    "matplotlib.pyplot",
    "absl.app",
    "ml_collections.config_flags",
)


def _run_forked(module: str) -> tuple[int, str]:
    """Exit status and stdout+stderr of `module` run as __main__ with --help, in a child."""
    with tempfile.TemporaryFile() as output:
        pid = os.fork()
        if pid == 0:  # The child: its own stdout/stderr, argv and exit status.
            status = 0
            try:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                sys.argv = [module, "--help"]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                status = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        output.seek(0)
        return os.waitstatus_to_exitcode(wait_status), output.read().decode(errors="replace")


def help_outputs(modules, cwd: str, env: dict[str, str], timeout: float = 600) -> dict:
    """{module: (exit status, output)} of `python -m module --help` for each of
    `modules`, from one interpreter started in `cwd` with `env`."""
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *modules],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {module: tuple(result) for module, result in json.loads(done.stdout).items()}


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # As `python -m` has it: modules of the repository.
    for name in SHARED_IMPORTS:
        __import__(name)
    results = {module: _run_forked(module) for module in sys.argv[1:]}
    sys.stdout.write(json.dumps(results))
