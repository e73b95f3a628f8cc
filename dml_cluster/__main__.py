from dml_cluster.cli import main

main()
