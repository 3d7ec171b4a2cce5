# Chapter 18: accuracy of every mixer on every task point of the full sweep, the mean of the seeds with the
# lowest and highest seed as the bar. Left: associative recall (MQAR) at two numbers of pairs and two lengths;
# right: the needle at two distances and selective copying. Data: the committed full sweep,
# chapters/18_trained_from_scratch/results/results.csv (task,length,x,variant,key,mean,low,high,held,read,...),
# read from figures/.
load 'style.gp'
if (!exists("dir")) dir = '../chapters/18_trained_from_scratch/results'
data = dir.'/results.csv'
set datafile separator ','
set terminal svg enhanced size 1080, 440 font 'sans-serif,12' background rgb 'white'
set output outfile
keys = 'mha gqa mqa window mla dsa linear gdn'
names = '"MHA" "GQA" "MQA" "window" "MLA" "DSA" "linear" "GDN"'
at(k) = sum [i = 1 : words(keys)] (word(keys, i) eq k ? i : 0)
set xtics () font ',11'
do for [i = 1 : words(keys)] { set xtics add (word(names, i) i) }
set xrange [0.4 : words(keys) + 0.6]
set yrange [0 : 1.05]
set ylabel 'accuracy on the scored tokens'
set key below font ',10'
set multiplot layout 1, 2 title 'What each mixer learned (matched parameters; mean of seeds, bars from the lowest to the highest)' font 'sans-serif,14'
set title 'associative recall (MQAR)' font 'sans-serif,13'
chance = 1.0 / 16
set arrow 1 from graph 0, first chance to graph 1, first chance nohead dashtype 3 linecolor rgb '#4d4d4d'
pick(t, n, x, dx) = (strcol(1) eq t && column(2) == n && column(3) == x) ? at(strcol(5)) + dx : NaN
plot data using (pick('recall', 64, 8, -0.2)) : 6 : 7 : 8 with yerrorbars linetype 1 title 'T = 64, 8 pairs', \
     data using (pick('recall', 64, 16, 0)) : 6 : 7 : 8 with yerrorbars linetype 2 title 'T = 64, 16 pairs', \
     data using (pick('recall', 128, 16, 0.2)) : 6 : 7 : 8 with yerrorbars linetype 3 title 'T = 128, 16 pairs'
set title 'needle and selective copying' font 'sans-serif,13'
plot data using (pick('needle', 64, 16, -0.2)) : 6 : 7 : 8 with yerrorbars linetype 4 title 'needle 16 tokens back', \
     data using (pick('needle', 64, 48, 0)) : 6 : 7 : 8 with yerrorbars linetype 5 title 'needle 48 tokens back', \
     data using (pick('copy', 64, 8, 0.2)) : 6 : 7 : 8 with yerrorbars linetype 6 title 'copy 8 tokens, T = 64'
unset multiplot
