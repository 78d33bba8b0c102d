from mesh.cli.main import app

app(prog_name="mesh")
