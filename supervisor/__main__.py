from supervisor.app.cli import main

main(prog_name="clado-supervisor")
