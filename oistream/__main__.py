from oistream.cli import run

run()
