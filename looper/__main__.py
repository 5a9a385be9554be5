from looper.cli import entry

entry()
