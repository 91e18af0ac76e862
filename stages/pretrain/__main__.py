from stages.pretrain.run import main

main()
