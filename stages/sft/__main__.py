from stages.sft.run import main

main()
