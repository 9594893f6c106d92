from lmstack.cli.main import run

run()
